//! The start-up probe: proves the sockmap data path works on this kernel before any route
//! uses it.
use std::{
    io::{self, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use proxy_common::SockLimit;

use super::{flush_early_bytes, Activation, Pair, Sockmap, Unavailable};
use crate::sockopt;

impl Sockmap {
    /// Loads the embedded object and runs [`Sockmap::probe`] on a blocking thread.
    pub async fn load_and_probe() -> Result<Sockmap, Unavailable> {
        let sockmap = std::sync::Arc::new(Sockmap::load(crate::EBPF_OBJECT)?);
        let probe = sockmap.clone();
        tokio::task::spawn_blocking(move || probe.probe())
            .await
            .map_err(|e| Unavailable::Probe(e.to_string()))??;
        std::sync::Arc::into_inner(sockmap)
            .ok_or_else(|| Unavailable::Probe("kept a reference".to_owned()))
    }

    /// Proves the data path works on this kernel, end to end: two loopback TCP connections are
    /// spliced, a byte written *before* the insert must arrive (the early-bytes flush of trap 3
    /// depends on a 2023 kernel fix), a byte each way after it, and a byte past the limit must
    /// be held on its source socket and readable there (backpressure, trap 8).
    pub fn probe(&self) -> Result<(), Unavailable> {
        let (mut a, b, c, mut d) = loopback_pairs().map_err(|(what, e)| err(what, e))?;
        a.write_all(b"e").map_err(|e| err("write", e))?;
        let pair = Pair {
            client: b.as_raw_fd(),
            client_cookie: sockopt::cookie(&b).map_err(|e| err("SO_COOKIE", e))?,
            upstream: c.as_raw_fd(),
            upstream_cookie: sockopt::cookie(&c).map_err(|e| err("SO_COOKIE", e))?,
        };
        // Give the early byte time to land in b's receive queue before the insert.
        std::thread::sleep(Duration::from_millis(20));
        let activation = self
            .insert(&pair, None)
            .map_err(|e| Unavailable::Probe(e.to_string()))?;
        let result = probe_redirect(activation, &pair, &mut a, &mut d)
            .and_then(|()| self.probe_hold(&pair, &mut a));
        self.remove(&pair);
        let _ = a.shutdown(Shutdown::Both);
        result
    }

    /// Backpressure: past its limit the verdict holds bytes on the source socket, where `recv`
    /// must find them (the userspace half of trap 8's handling).
    fn probe_hold(&self, pair: &Pair, a: &mut TcpStream) -> Result<(), Unavailable> {
        let redirected = self.stats(pair.client_cookie).bytes;
        let hold = SockLimit {
            limit: redirected,
            report_at: redirected,
            generation: 2,
            consumed: 0,
        };
        self.set_limit(pair.client_cookie, hold)
            .map_err(|e| Unavailable::Probe(format!("set limit: {e}")))?;
        a.write_all(b"h").map_err(|e| err("write", e))?;
        let mut held = [0u8; 1];
        let mut found = false;
        for _ in 0..200 {
            match sockopt::recv_nonblocking(pair.client, &mut held) {
                Ok(Some(1)) => {
                    found = true;
                    break;
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(err("recv of a held byte", e)),
            }
        }
        let stats = self.stats(pair.client_cookie);
        if !found || held[0] != b'h' || stats.passed != 1 || stats.held != 1 {
            return Err(Unavailable::Probe(format!(
                "a byte held past the limit was not readable on the source \
                 (found {found}, passed {}, held {})",
                stats.passed, stats.held
            )));
        }
        Ok(())
    }
}

fn err(step: &'static str, source: io::Error) -> Unavailable {
    Unavailable::ProbeIo { step, source }
}

/// Two loopback connections: (a's client end, its accepted end b, c's client end, its accepted
/// end d); b and c are the pair the probe splices.
fn loopback_pairs(
) -> Result<(TcpStream, TcpStream, TcpStream, TcpStream), (&'static str, io::Error)> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| ("bind", e))?;
    let addr = listener.local_addr().map_err(|e| ("local_addr", e))?;
    let a = TcpStream::connect(addr).map_err(|e| ("connect", e))?;
    let (b, _) = listener.accept().map_err(|e| ("accept", e))?;
    let c = TcpStream::connect(addr).map_err(|e| ("connect", e))?;
    let (d, _) = listener.accept().map_err(|e| ("accept", e))?;
    for s in [&a, &d] {
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| ("timeout", e))?;
    }
    Ok((a, b, c, d))
}

/// The early byte (trap 3) and a byte each way must arrive.
fn probe_redirect(
    activation: Activation,
    pair: &Pair,
    a: &mut TcpStream,
    d: &mut TcpStream,
) -> Result<(), Unavailable> {
    if activation != Activation::Both {
        return Err(Unavailable::Probe(
            "a fresh loopback connection could not be activated".into(),
        ));
    }
    for fd in [pair.client, pair.upstream] {
        flush_early_bytes(fd).map_err(|e| {
            Unavailable::Probe(format!(
                "this kernel does not hand bytes queued before the insert \
                 to the verdict program (recv on a sockmap socket returned them: {e}); \
                 spliced needs that to flush them (trap 3), which came with the 2023 \
                 tcp_bpf fixes (\"TCP data stall on recv before accept\"), not in 5.10"
            ))
        })?;
    }
    let mut got = [0u8; 2];
    d.read_exact(&mut got[..1])
        .map_err(|e| err("a byte sent before the insert did not arrive", e))?;
    a.write_all(b"x").map_err(|e| err("write", e))?;
    d.read_exact(&mut got[1..])
        .map_err(|e| err("no redirect client->upstream", e))?;
    if &got != b"ex" {
        return Err(Unavailable::Probe(format!("got {got:?}, sent \"ex\"")));
    }
    d.write_all(b"y").map_err(|e| err("write", e))?;
    a.read_exact(&mut got[..1])
        .map_err(|e| err("no redirect upstream->client", e))?;
    if got[0] != b'y' {
        return Err(Unavailable::Probe("wrong byte upstream->client".into()));
    }
    Ok(())
}
