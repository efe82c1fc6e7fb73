//! The upstream of the small-message figures: run inside the namespace as the hidden
//! `xtask bench --serve PORT` (under `ip netns exec`), listening on [::]:PORT.
//!
//! Protocol, chosen so that the upstream side closes first unless the client asks otherwise (its
//! TIME_WAIT entries then pile up in the namespace, not on the dialing side, where thousands of
//! short connections to one port would exhaust the ephemeral ports):
//!
//! - on accept the server sends one byte, [`GREETING`] (so connect-to-first-byte can be timed
//!   and every idle connection is known to reach the upstream);
//! - a TLS record first (a handshake record, byte 22: the SNI-routed contender's ClientHello) is
//!   read and dropped; what follows is the client's first byte;
//! - the client's first byte chooses: [`QUIT`] closes at once; [`SHORT`] starts a
//!   [`SHORT_LEN`]-byte message that is echoed, then the server closes; [`CLIENT_CLOSES`] the
//!   same, but the server waits for the client's EOF and closes after it; anything else starts an
//!   echo of everything until the client's EOF.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
};

pub const GREETING: u8 = b'G';
pub const QUIT: u8 = b'Q';
pub const SHORT: u8 = b'S';
pub const CLIENT_CLOSES: u8 = b'C';
pub const SHORT_LEN: usize = 100;
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 22;

/// Serves ports `first..=last` until stdin closes (the bench drops its end, or dies).
pub fn serve(first: u16, last: u16) -> Result<()> {
    super::sys::raise_nofile(1 << 20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        for port in first..=last.max(first) {
            let socket = TcpSocket::new_v6()?;
            socket.set_reuseaddr(true)?;
            socket
                .bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
                .with_context(|| format!("cannot bind [::]:{port}"))?;
            tokio::spawn(accept_loop(socket.listen(4096)?));
        }
        println!("ready");
        std::io::stdout().flush()?;
        tokio::task::spawn_blocking(|| {
            let mut b = [0u8; 64];
            while let Ok(1..) = std::io::stdin().read(&mut b) {}
        })
        .await?;
        Ok::<(), anyhow::Error>(())
    })?;
    std::process::exit(0)
}

async fn accept_loop(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream));
            }
            Err(e) => {
                // EMFILE and the like: say so, back off, go on.
                eprintln!("bench server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Reads until `buf[..]` holds at least `want` bytes (`have` already there); the new length, or
/// `None` at EOF, an error, or a `want` larger than the buffer.
async fn fill(s: &mut TcpStream, buf: &mut [u8], mut have: usize, want: usize) -> Option<usize> {
    if want > buf.len() {
        return None;
    }
    // Bounded: each read adds at least one byte or ends the loop.
    while have < want {
        match s.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => return None,
            Ok(k) => have += k,
        }
    }
    Some(have)
}

async fn handle(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    if s.write_all(&[GREETING]).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 32 * 1024];
    let Some(mut n) = fill(&mut s, &mut buf, 0, 1).await else {
        return;
    };
    let mut at = 0;
    if buf[0] == TLS_HANDSHAKE {
        let Some(k) = fill(&mut s, &mut buf, n, 5).await else {
            return;
        };
        at = 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
        let Some(k) = fill(&mut s, &mut buf, k, at + 1).await else {
            return;
        };
        n = k;
    }
    match buf[at] {
        QUIT => {}
        mode @ (SHORT | CLIENT_CLOSES) => {
            let Some(_) = fill(&mut s, &mut buf, n, at + SHORT_LEN).await else {
                return;
            };
            if s.write_all(&buf[at..at + SHORT_LEN]).await.is_err() {
                return;
            }
            if mode == CLIENT_CLOSES {
                // The client closes first; its EOF (or a reset) ends the wait.
                while let Ok(1..) = s.read(&mut buf).await {}
            }
        }
        _ => {
            if s.write_all(&buf[at..n]).await.is_err() {
                return;
            }
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => {
                        if s.write_all(&buf[..k]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
    let _ = s.shutdown().await;
}
