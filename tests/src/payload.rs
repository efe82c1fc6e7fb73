//! [`Payload`]: a deterministic byte stream and its SHA-256, for comparing both ends of a
//! transfer; reading to EOF while hashing.
use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

/// A deterministic stream of `len` bytes: 64 KiB blocks of pseudo-random bytes, each starting
/// with its own index, so a lost, duplicated or reordered block changes the hash.
pub struct Payload {
    pub len: u64,
    block: Vec<u8>,
}

pub const BLOCK: usize = 64 * 1024;

impl Payload {
    pub fn new(len: u64, seed: u64) -> Payload {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let block = (0..BLOCK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        Payload { len, block }
    }

    fn block(&mut self, i: u64) -> &[u8] {
        self.block[..8].copy_from_slice(&i.to_le_bytes());
        &self.block
    }

    /// Writes the whole stream to `w`; returns its SHA-256.
    pub fn send(&mut self, w: &mut impl Write) -> io::Result<[u8; 32]> {
        let mut hash = Sha256::new();
        let mut sent = 0u64;
        let mut i = 0;
        while sent < self.len {
            let n = (self.len - sent).min(BLOCK as u64) as usize;
            let b = &self.block(i)[..n];
            w.write_all(b)?;
            hash.update(b);
            sent += n as u64;
            i += 1;
        }
        Ok(hash.finalize().into())
    }

    /// The stream's bytes from `offset` to the end of the 64 KiB block holding it (or of the
    /// stream), for writers that take partial writes: write a prefix, ask again from the new
    /// offset. Empty at or past the end.
    pub fn chunk(&mut self, offset: u64) -> &[u8] {
        let len = self.len;
        let within = (offset % BLOCK as u64) as usize;
        let n = (BLOCK - within).min(len.saturating_sub(offset).min(BLOCK as u64) as usize);
        &self.block(offset / BLOCK as u64)[within..within + n]
    }

    /// The SHA-256 of the stream, without sending it.
    pub fn sha256(&mut self) -> [u8; 32] {
        self.send(&mut io::sink()).unwrap()
    }
}

/// Reads `r` to EOF; returns (bytes, SHA-256).
pub fn receive(r: &mut impl Read) -> io::Result<(u64, [u8; 32])> {
    let mut hash = Sha256::new();
    let n = receive_into(r, &mut hash)?;
    Ok((n, hash.finalize().into()))
}

/// Reads `r` to EOF into `hash` (which may have hashed a first part already); returns the
/// byte count.
pub fn receive_into(r: &mut impl Read, hash: &mut Sha256) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            // A signal for another test thread (SIGCHLD of a child it started) can land here.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => r?,
        };
        if n == 0 {
            return Ok(total);
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
}

/// Reads exactly `n` bytes and returns them.
pub fn read_exact(r: &mut impl Read, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).expect("read_exact");
    buf
}

/// `len` bytes of the deterministic stream of `seed` (see [`Payload`]).
pub fn bytes(len: u64, seed: u64) -> Vec<u8> {
    let mut v = Vec::new();
    Payload::new(len, seed).send(&mut v).unwrap();
    v
}
