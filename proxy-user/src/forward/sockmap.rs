//! The sockmap data path: after set-up no payload crosses into userspace. The daemon only
//! watches for FIN and RST and carries them across, in the order the traps of sockmap.md demand.
use std::{
    io,
    net::TcpStream,
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use super::{End, Outcome};
use crate::{
    sockmap::{flush_early_bytes, InsertError, Pair, Sockmap},
    sockopt,
    watch::Watcher,
};

/// A connection sockmap would not take; hand it to a userspace path.
pub struct Declined {
    pub client: TcpStream,
    pub upstream: TcpStream,
    pub why: InsertError,
}

/// Socket state as `poll(2)` reports it right now.
#[derive(Clone, Copy, Default)]
struct State {
    /// The peer's FIN has arrived.
    eof: bool,
    /// An error (RST, timeout) is pending.
    error: bool,
}

fn poll_state(fd: RawFd) -> io::Result<State> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, timeout 0.
    if unsafe { libc::poll(&mut p, 1, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(State {
        eof: p.revents & libc::POLLRDHUP != 0,
        error: p.revents & libc::POLLERR != 0,
    })
}

/// Bytes `src` has received (less its FIN) that are not yet in `dst`'s send queue, i.e. still
/// in flight through the verdict or waiting in `dst`'s psock backlog.
///
/// Trap 6: shutting `dst` down, or removing it from the maps, while its backlog holds bytes
/// drops them (a prototype lost 9.9 MB of 1 GiB). Everything `src` received went through the
/// verdict into `dst`, so `dst` is drained when
/// `src.bytes_received - FIN == dst.bytes_acked - SYN(if dst called connect()) + SIOCOUTQ(dst)`.
fn undelivered(src: &TcpStream, src_fin: bool, dst: &TcpStream, dst_connected: bool) -> io::Result<u64> {
    let s = sockopt::tcp_info(src)?;
    let d = sockopt::tcp_info(dst)?;
    let queued = sockopt::outq(dst)?;
    let received = s.bytes_received - u64::from(src_fin && s.bytes_received > 0);
    let written = (d.bytes_acked + queued).saturating_sub(u64::from(dst_connected));
    Ok(received.saturating_sub(written))
}

/// Polling interval bounds while a backlog drains. The backlog has no wakeup of its own: while
/// the destination's send buffer is full the kernel retries it once a jiffy (trap 9).
const DRAIN_POLL_MIN: Duration = Duration::from_millis(1);
const DRAIN_POLL_MAX: Duration = Duration::from_millis(50);

/// Forwards `client` <-> `upstream` in the kernel until both sides have closed, one fails, or
/// `cancel` fires. Returns the sockets back if sockmap cannot take them.
pub async fn run(
    sockmap: &Sockmap,
    watcher: &Watcher,
    client: TcpStream,
    upstream: TcpStream,
    send_buffer: Option<usize>,
    cancel: &CancellationToken,
) -> Result<Outcome, Declined> {
    if let Some(bytes) = send_buffer {
        // Trap 9: with a full send buffer the backlog retries once a jiffy and write-space
        // wakeups do not advance it; a large buffer keeps the upload direction at line rate.
        let _ = sockopt::set_send_buffer(&client, bytes);
        let _ = sockopt::set_send_buffer(&upstream, bytes);
    }
    let (client_cookie, upstream_cookie) = match (sockopt::cookie(&client), sockopt::cookie(&upstream)) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            return Ok(abort(&client, &upstream, None, sockmap, End::Ours(e)));
        }
    };
    let pair = Pair {
        client: client.as_raw_fd(),
        client_cookie,
        upstream: upstream.as_raw_fd(),
        upstream_cookie,
    };
    let watch = match watcher.watch(&[pair.client, pair.upstream]) {
        Ok(w) => w,
        Err(e) => return Ok(abort(&client, &upstream, None, sockmap, End::Ours(e))),
    };
    if let Err(why) = sockmap.insert(&pair) {
        // The upstream may have been active for a moment (its activation succeeded, the
        // client's did not): wait until what it redirected has left the client's backlog.
        let drained = drain_then_remove(sockmap, &pair, &client).await;
        drop(watch);
        if !drained {
            let e = io::Error::other(format!("{why}, and the client did not read what was already redirected"));
            return Ok(abort(&client, &upstream, None, sockmap, End::ClientFailed(e)));
        }
        return Err(Declined {
            client,
            upstream,
            why,
        });
    }
    // Trap 3: bytes that arrived before activation sit in the receive queues until flushed.
    for fd in [pair.client, pair.upstream] {
        if let Err(e) = flush_early_bytes(fd) {
            drop(watch);
            return Ok(abort(&client, &upstream, Some(&pair), sockmap, End::Ours(e)));
        }
    }

    let (mut up_done, mut down_done) = (false, false);
    let mut poll_interval = DRAIN_POLL_MIN;
    let end = loop {
        let (c, u) = match (poll_state(pair.client), poll_state(pair.upstream)) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => break End::Ours(e),
        };
        if c.error {
            break End::ClientFailed(socket_error(&client));
        }
        if u.error {
            break End::UpstreamFailed(socket_error(&upstream));
        }
        // A FIN arrived: forward it once everything before it has reached the peer's queue.
        if c.eof && !up_done {
            match undelivered(&client, true, &upstream, true) {
                Ok(0) => match sockopt::shutdown_write(&upstream) {
                    Ok(()) => up_done = true,
                    Err(e) => break End::UpstreamFailed(e),
                },
                Ok(_) => {}
                Err(e) => break End::Ours(e),
            }
        }
        if u.eof && !down_done {
            match undelivered(&upstream, true, &client, false) {
                Ok(0) => match sockopt::shutdown_write(&client) {
                    Ok(()) => down_done = true,
                    Err(e) => break End::ClientFailed(e),
                },
                Ok(_) => {}
                Err(e) => break End::Ours(e),
            }
        }
        if up_done && down_done {
            break End::Complete;
        }
        let draining = (c.eof && !up_done) || (u.eof && !down_done);
        tokio::select! {
            () = watch.changed() => poll_interval = DRAIN_POLL_MIN,
            () = tokio::time::sleep(poll_interval), if draining => {
                poll_interval = (poll_interval * 2).min(DRAIN_POLL_MAX);
            }
            () = cancel.cancelled() => break End::Shutdown,
        }
    };
    drop(watch);
    Ok(match end {
        End::Complete => {
            let outcome = counted(sockmap, &pair, End::Complete);
            // Both backlogs are empty (checked before each shutdown): removal loses nothing.
            sockmap.remove(&pair);
            outcome
        }
        end => abort(&client, &upstream, Some(&pair), sockmap, end),
    })
}

fn counted(sockmap: &Sockmap, pair: &Pair, end: End) -> Outcome {
    Outcome {
        up: sockmap.stats(pair.client_cookie).bytes,
        down: sockmap.stats(pair.upstream_cookie).bytes,
        end,
    }
}

/// Ends the connection with an RST to both sides.
fn abort(
    client: &TcpStream,
    upstream: &TcpStream,
    pair: Option<&Pair>,
    sockmap: &Sockmap,
    end: End,
) -> Outcome {
    let outcome = match pair {
        Some(pair) => {
            let o = counted(sockmap, pair, end);
            sockmap.remove(pair);
            o
        }
        None => Outcome { up: 0, down: 0, end },
    };
    let _ = sockopt::set_linger_zero(client);
    let _ = sockopt::set_linger_zero(upstream);
    outcome
}

fn socket_error(s: &TcpStream) -> io::Error {
    match sockopt::take_error(s) {
        Ok(Some(e)) => e,
        Ok(None) => io::Error::new(io::ErrorKind::ConnectionReset, "connection closed"),
        Err(e) => e,
    }
}

/// After a failed insert: if the upstream was active for a moment (its activation succeeded,
/// the client's did not), wait until what the verdict redirected has left the client's backlog,
/// then take the pair out of the maps. Returns whether nothing was left behind.
async fn drain_then_remove(sockmap: &Sockmap, pair: &Pair, client: &TcpStream) -> bool {
    sockmap.deactivate(pair);
    let redirected = sockmap.stats(pair.upstream_cookie).bytes;
    let mut drained = redirected == 0;
    // Bounded: 30 s for a client that does not read.
    for _ in 0..3000 {
        if drained {
            break;
        }
        let written = sockopt::tcp_info(client)
            .and_then(|i| Ok(i.bytes_acked + sockopt::outq(client)?));
        match written {
            Ok(w) if w >= redirected => drained = true,
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => break,
        }
    }
    sockmap.remove(pair);
    drained
}

#[cfg(test)]
mod tests {
    //! The sockmap path on loopback pairs, without the daemon around it. Needs root and the
    //! eBPF object; skipped otherwise, unless CI=true or SPLICED_REQUIRE_EBPF=1.
    use std::{
        io::{Read, Write},
        net::{Shutdown, TcpListener},
        time::Duration,
    };

    use super::*;

    fn required() -> bool {
        std::env::var("CI").is_ok_and(|v| v == "true")
            || std::env::var("SPLICED_REQUIRE_EBPF").is_ok_and(|v| v == "1")
    }

    fn load() -> Option<Sockmap> {
        match Sockmap::load(crate::EBPF_OBJECT) {
            Ok(s) => Some(s),
            Err(e) if !required() => {
                eprintln!("skipping: {e}");
                None
            }
            Err(e) => panic!("sockmap unavailable: {e}"),
        }
    }

    /// (client end, proxy's client socket, proxy's upstream socket, upstream end)
    fn sockets() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let a = TcpStream::connect(addr).unwrap();
        let (b, _) = l.accept().unwrap();
        let c = TcpStream::connect(addr).unwrap();
        let (d, _) = l.accept().unwrap();
        for s in [&a, &d] {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        }
        b.set_nonblocking(true).unwrap();
        c.set_nonblocking(true).unwrap();
        (a, b, c, d)
    }

    fn pattern(i: u64) -> u8 {
        (i.wrapping_mul(2654435761) >> 13) as u8
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn half_close_both_ways_keeps_every_byte() {
        let Some(sockmap) = load() else { return };
        let watcher = Watcher::new().unwrap();
        let (mut a, b, c, mut d) = sockets();
        const N: u64 = 64 << 20;
        let cancel = CancellationToken::new();
        let proxy = async { run(&sockmap, &watcher, b, c, Some(16 << 20), &cancel).await };
        let ends = tokio::task::spawn_blocking(move || {
            let writer = std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut i = 0u64;
                while i < N {
                    for x in buf.iter_mut() {
                        *x = pattern(i);
                        i += 1;
                    }
                    a.write_all(&buf).unwrap();
                }
                a.shutdown(Shutdown::Write).unwrap();
                let mut reply = Vec::new();
                a.read_to_end(&mut reply).unwrap();
                reply
            });
            let mut buf = vec![0u8; 65536];
            let mut i = 0u64;
            loop {
                let n = d.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                for &x in &buf[..n] {
                    assert_eq!(x, pattern(i), "byte {i} corrupted");
                    i += 1;
                }
            }
            assert_eq!(i, N, "upstream got {i} of {N} bytes");
            d.write_all(b"reply after EOF").unwrap();
            d.shutdown(Shutdown::Write).unwrap();
            writer.join().unwrap()
        });
        let (outcome, reply) = tokio::join!(proxy, ends);
        let outcome = outcome.ok().expect("sockmap declined an established pair");
        assert_eq!(reply.unwrap(), b"reply after EOF");
        assert!(matches!(outcome.end, End::Complete), "{:?}", outcome.end);
        assert_eq!((outcome.up, outcome.down), (N, 15));
    }
}
