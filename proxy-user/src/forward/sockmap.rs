//! The sockmap data path: after set-up no payload crosses into userspace. The daemon only
//! watches for FIN and RST and carries them across, in the order the traps of sockmap.md demand.
use std::{
    io,
    net::TcpStream,
    os::fd::{AsRawFd, RawFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use proxy_common::SockLimit;
use tokio::io::{unix::AsyncFd, Interest};
use tokio_util::sync::CancellationToken;

use super::{End, Outcome};
use crate::{
    sockmap::{flush_early_bytes, InsertError, Pair, Sockmap},
    sockopt,
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
fn undelivered(
    src: &TcpStream,
    src_fin: bool,
    dst: &TcpStream,
    dst_connected: bool,
) -> io::Result<u64> {
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

/// The smallest per-direction allowance, granted even when the global pool is exhausted, so a
/// connection always makes progress.
const MIN_GRANT: u64 = 256 * 1024;

/// The global bound on bytes held in psock backlogs across all connections (trap 8). Each
/// direction of each sockmap connection reserves its allowance here for its lifetime.
#[derive(Debug)]
pub struct Pool {
    max: u64,
    reserved: AtomicU64,
}

impl Pool {
    /// A pool of `max` bytes.
    pub fn new(max: u64) -> Self {
        Pool {
            max,
            reserved: AtomicU64::new(0),
        }
    }

    /// Reserves up to `want` bytes: what is left, but at least [`MIN_GRANT`].
    fn reserve(&self, want: u64) -> u64 {
        let mut grant = 0;
        let _ = self
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |reserved| {
                grant = want
                    .min(self.max.saturating_sub(reserved))
                    .max(MIN_GRANT.min(want));
                Some(reserved + grant)
            });
        grant
    }

    fn release(&self, grant: u64) {
        self.reserved.fetch_sub(grant, Ordering::AcqRel);
    }

    /// Bytes reserved now.
    #[cfg(test)]
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }
}

/// Backpressure settings of one connection.
#[derive(Clone, Debug)]
pub struct Budget {
    /// Most bytes one direction may hold in the peer's backlog (route `max_buffered`).
    pub per_direction: u64,
    /// The global pool (`max_buffered_total`).
    pub pool: Arc<Pool>,
}

/// One direction of a sockmap connection: the bytes `src` receives go to `dst`.
struct Direction<'a> {
    src: &'a TcpStream,
    src_cookie: u64,
    dst: &'a TcpStream,
    /// `dst` called connect(): its `bytes_acked` counts the SYN.
    dst_connected: bool,
    /// This direction's share of the global pool.
    grant: u64,
    generation: u64,
    /// Out of the active map until the peer catches up.
    paused: bool,
    /// Bytes moved by userspace after `src` could not be re-activated (it had gone to
    /// CLOSE_WAIT while paused: trap 4 on the way back).
    copied: u64,
    /// `src`'s FIN has been forwarded as `dst`'s.
    done: bool,
}

impl Direction<'_> {
    /// Bytes from `src` that have entered `dst`'s send queue.
    fn written(&self) -> io::Result<u64> {
        let d = sockopt::tcp_info(self.dst)?;
        Ok(
            (d.bytes_acked + sockopt::outq(self.dst)?)
                .saturating_sub(u64::from(self.dst_connected)),
        )
    }

    /// Redirected (or copied) from `src` and not yet in `dst`'s send queue: the psock backlog
    /// that trap 8 is about.
    fn backlog(&self, sockmap: &Sockmap) -> io::Result<u64> {
        let moved = sockmap.stats(self.src_cookie).bytes + self.copied;
        Ok(moved.saturating_sub(self.written()?))
    }

    /// Asks the verdict to report again once `grant` more bytes than `dst` has taken are
    /// redirected.
    fn arm(&mut self, sockmap: &Sockmap) -> io::Result<()> {
        self.generation += 1;
        let limit = SockLimit {
            limit: self.written()? + self.grant,
            generation: self.generation,
        };
        sockmap
            .set_limit(self.src_cookie, limit)
            .map_err(io::Error::other)
    }

    /// Handles a pressure report, if one came for this generation: pause `src` if its backlog
    /// is over the grant, else raise the limit.
    fn on_pressure(&mut self, sockmap: &Sockmap) -> io::Result<()> {
        if self.paused || self.done || sockmap.stats(self.src_cookie).reported != self.generation {
            return Ok(());
        }
        if self.backlog(sockmap)? > self.grant {
            sockmap.pause(self.src_cookie);
            self.paused = true;
            tracing::trace!(
                cookie = self.src_cookie,
                "paused: peer backlog over {} bytes",
                self.grant
            );
            Ok(())
        } else {
            self.arm(sockmap)
        }
    }

    /// While paused: resume once the backlog is down to half the grant. A source that went to
    /// CLOSE_WAIT meanwhile cannot be re-inserted (trap 4): once the backlog is empty its last
    /// bytes are copied in userspace instead.
    async fn on_tick(&mut self, sockmap: &Sockmap) -> io::Result<()> {
        if !self.paused {
            return Ok(());
        }
        let backlog = self.backlog(sockmap)?;
        if backlog > self.grant / 2 {
            return Ok(());
        }
        self.arm(sockmap)?;
        match sockmap.resume(self.src_cookie, self.src.as_raw_fd()) {
            Ok(()) => {
                self.paused = false;
                tracing::trace!(cookie = self.src_cookie, "resumed");
                // Trap 3: what queued while paused waits for the next packet otherwise.
                flush_early_bytes(self.src.as_raw_fd())
            }
            Err(InsertError::NotEstablished) if backlog == 0 => {
                // Everything `src` received before its FIN, less what already went through.
                let info = sockopt::tcp_info(self.src)?;
                let moved = sockmap.stats(self.src_cookie).bytes + self.copied;
                let left = info.bytes_received.saturating_sub(1 + moved);
                self.copied += copy_tail(self.src, self.dst, left).await?;
                self.paused = false;
                Ok(())
            }
            Err(InsertError::NotEstablished) => Ok(()),
            Err(InsertError::Map(e)) => Err(io::Error::other(e)),
        }
    }
}

/// Copies the `left` bytes still in `src`'s receive queue (it is at EOF) into `dst`, in order.
///
/// Exactly `left`, never up to EOF: a FIN that reached the verdict while `src` was active sits in
/// its psock as a zero-length message (trap 1), and `recv` on it fails with EFAULT.
async fn copy_tail(src: &TcpStream, dst: &TcpStream, left: u64) -> io::Result<u64> {
    if left == 0 {
        return Ok(0);
    }
    struct Fd(RawFd);
    impl AsRawFd for Fd {
        fn as_raw_fd(&self) -> RawFd {
            self.0
        }
    }
    // SAFETY: `dst` outlives the registration, which is dropped at the end of this function.
    let dst_fd =
        unsafe { AsyncFd::register_with_interest(Fd(dst.as_raw_fd()), Interest::WRITABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    while total < left {
        let want = buf.len().min((left - total) as usize);
        let n = match sockopt::recv_nonblocking(src.as_raw_fd(), &mut buf[..want])? {
            Some(0) | None => {
                return Err(io::Error::other(format!(
                    "{} of {left} bytes left after the FIN could be read",
                    total
                )))
            }
            Some(n) => n,
        };
        let mut sent = 0;
        while sent < n {
            let mut guard = dst_fd.writable().await?;
            match guard.try_io(|fd| {
                // SAFETY: `buf[sent..n]` is valid for reads.
                let r = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        buf[sent..n].as_ptr().cast(),
                        n - sent,
                        libc::MSG_NOSIGNAL,
                    )
                };
                if r < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(r as usize)
                }
            }) {
                Ok(Ok(k)) => sent += k,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        total += n as u64;
    }
    Ok(total)
}

/// Forwards `client` <-> `upstream` in the kernel until both sides have closed, one fails, or
/// `cancel` fires. Returns the sockets back if sockmap cannot take them.
pub async fn run(
    sockmap: &Sockmap,
    client: TcpStream,
    upstream: TcpStream,
    send_buffer: Option<usize>,
    budget: &Budget,
    cancel: &CancellationToken,
) -> Result<Outcome, Declined> {
    if let Some(bytes) = send_buffer {
        // Trap 9: with a full send buffer the backlog retries once a jiffy and write-space
        // wakeups do not advance it; a large buffer keeps the upload direction at line rate.
        let _ = sockopt::set_send_buffer(&client, bytes);
        let _ = sockopt::set_send_buffer(&upstream, bytes);
    }
    let (client_cookie, upstream_cookie) =
        match (sockopt::cookie(&client), sockopt::cookie(&upstream)) {
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
    let watch = match sockmap.watcher().watch(&[
        (pair.client, client_cookie),
        (pair.upstream, upstream_cookie),
    ]) {
        Ok(w) => w,
        Err(e) => return Ok(abort(&client, &upstream, None, sockmap, End::Ours(e))),
    };
    // Released on every way out, a dropped (cancelled) future included.
    let reservation = Reservation {
        pool: &budget.pool,
        grants: [
            budget.pool.reserve(budget.per_direction),
            budget.pool.reserve(budget.per_direction),
        ],
    };
    let grants = reservation.grants;
    splice_pair(sockmap, &watch, client, upstream, &pair, grants, cancel).await
}

/// One connection's share of the global pool, given back when dropped.
struct Reservation<'a> {
    pool: &'a Pool,
    grants: [u64; 2],
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        for grant in self.grants {
            self.pool.release(grant);
        }
    }
}

async fn splice_pair(
    sockmap: &Sockmap,
    watch: &crate::watch::Watch,
    client: TcpStream,
    upstream: TcpStream,
    pair: &Pair,
    grants: [u64; 2],
    cancel: &CancellationToken,
) -> Result<Outcome, Declined> {
    let mut up = Direction {
        src: &client,
        src_cookie: pair.client_cookie,
        dst: &upstream,
        dst_connected: true,
        grant: grants[0],
        generation: 1,
        paused: false,
        copied: 0,
        done: false,
    };
    let mut down = Direction {
        src: &upstream,
        src_cookie: pair.upstream_cookie,
        dst: &client,
        dst_connected: false,
        grant: grants[1],
        generation: 1,
        paused: false,
        copied: 0,
        done: false,
    };
    // Nothing has been written to either socket yet, so the first limit is the grant itself.
    let first = SockLimit {
        limit: grants[0].min(grants[1]),
        generation: 1,
    };
    if let Err(why) = sockmap.insert(pair, first) {
        // The upstream may have been active for a moment (its activation succeeded, the
        // client's did not): wait until what it redirected has left the client's backlog.
        let drained = drain_then_remove(sockmap, pair, &client).await;
        if !drained {
            let e = io::Error::other(format!(
                "{why}, and the client did not read what was already redirected"
            ));
            return Ok(abort(
                &client,
                &upstream,
                None,
                sockmap,
                End::ClientFailed(e),
            ));
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
            return Ok(abort(&client, &upstream, Some(pair), sockmap, End::Ours(e)));
        }
    }

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
        if let Err(e) = up
            .on_pressure(sockmap)
            .and_then(|()| down.on_pressure(sockmap))
        {
            break End::Ours(e);
        }
        // A FIN arrived: forward it once everything before it has reached the peer's queue.
        if c.eof && !up.done && !up.paused {
            match undelivered(&client, true, &upstream, true) {
                Ok(0) => match sockopt::shutdown_write(&upstream) {
                    Ok(()) => up.done = true,
                    Err(e) => break End::UpstreamFailed(e),
                },
                Ok(_) => {}
                Err(e) => break End::Ours(e),
            }
        }
        if u.eof && !down.done && !down.paused {
            match undelivered(&upstream, true, &client, false) {
                Ok(0) => match sockopt::shutdown_write(&client) {
                    Ok(()) => down.done = true,
                    Err(e) => break End::ClientFailed(e),
                },
                Ok(_) => {}
                Err(e) => break End::Ours(e),
            }
        }
        if up.done && down.done {
            break End::Complete;
        }
        let waiting = (c.eof && !up.done) || (u.eof && !down.done) || up.paused || down.paused;
        tokio::select! {
            () = watch.changed() => poll_interval = DRAIN_POLL_MIN,
            () = tokio::time::sleep(poll_interval), if waiting => {
                poll_interval = (poll_interval * 2).min(DRAIN_POLL_MAX);
                let ticked = match up.on_tick(sockmap).await {
                    Ok(()) => down.on_tick(sockmap).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = ticked {
                    break End::Ours(e);
                }
            }
            () = cancel.cancelled() => break End::Shutdown,
        }
    };
    let copied = (up.copied, down.copied);

    let mut outcome = match end {
        End::Complete => {
            let outcome = counted(sockmap, pair, End::Complete);
            // Both backlogs are empty (checked before each shutdown): removal loses nothing.
            sockmap.remove(pair);
            outcome
        }
        end => abort(&client, &upstream, Some(pair), sockmap, end),
    };
    outcome.up += copied.0;
    outcome.down += copied.1;
    Ok(outcome)
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
        None => Outcome {
            up: 0,
            down: 0,
            end,
        },
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
        let written =
            sockopt::tcp_info(client).and_then(|i| Ok(i.bytes_acked + sockopt::outq(client)?));
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
        let (mut a, b, c, mut d) = sockets();
        const N: u64 = 64 << 20;
        let cancel = CancellationToken::new();
        let budget = Budget {
            per_direction: 4 << 20,
            pool: Arc::new(Pool::new(64 << 20)),
        };
        let proxy = async { run(&sockmap, b, c, Some(16 << 20), &budget, &cancel).await };
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_reader_stalls_the_sender() {
        let Some(sockmap) = load() else { return };
        let (a, b, c, mut d) = sockets();
        const BUDGET: u64 = 4 << 20;
        let pool = Arc::new(Pool::new(64 << 20));
        let budget = Budget {
            per_direction: BUDGET,
            pool: pool.clone(),
        };
        let cancel = CancellationToken::new();
        let proxy = async { run(&sockmap, b, c, Some(16 << 20), &budget, &cancel).await };
        let ends = tokio::task::spawn_blocking(move || {
            // The upstream reads nothing for 2 s while the client writes what it can.
            a.set_nonblocking(true).unwrap();
            let mut a = a;
            let start = std::time::Instant::now();
            let mut sent = 0u64;
            let mut buf = vec![0u8; 65536];
            while start.elapsed() < Duration::from_secs(2) {
                for (k, x) in buf.iter_mut().enumerate() {
                    *x = pattern(sent + k as u64);
                }
                match a.write(&buf) {
                    Ok(n) => sent += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        // Re-generate from the new offset next time round.
                    }
                    Err(e) => panic!("client write: {e}"),
                }
            }
            a.set_nonblocking(false).unwrap();
            a.shutdown(Shutdown::Write).unwrap();
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
            assert_eq!(i, sent);
            d.shutdown(Shutdown::Write).unwrap();
            sent
        });
        let (outcome, sent) = tokio::join!(proxy, ends);
        let sent = sent.unwrap();
        let outcome = outcome.ok().expect("sockmap declined an established pair");
        assert!(matches!(outcome.end, End::Complete), "{:?}", outcome.end);
        assert_eq!(outcome.up, sent);
        // Socket buffers: the client's send queue, the proxy's receive and 16 MiB send queue,
        // the upstream's receive queue (tcp_rmem max 6 MiB each); plus the budget.
        let bound = BUDGET + (16 << 20) + 3 * (6 << 20) + (4 << 20);
        eprintln!("client got {sent} bytes out while the upstream did not read (bound {bound})");
        assert!(sent < bound, "client sent {sent} bytes, bound {bound}");
        assert_eq!(pool.reserved(), 0);
    }

    /// The client's FIN arrives while its socket is paused, so it cannot be re-activated
    /// (CLOSE_WAIT): its last bytes go through the userspace tail copy.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fin_while_paused_loses_nothing() {
        let Some(sockmap) = load() else { return };
        let (mut a, b, c, mut d) = sockets();
        const N: u64 = 8 << 20;
        let budget = Budget {
            per_direction: 1 << 20,
            pool: Arc::new(Pool::new(64 << 20)),
        };
        // A large receive buffer on the proxy's client socket, so that the rest of the data and
        // the FIN fit into it while it is paused.
        socket2::SockRef::from(&b)
            .set_recv_buffer_size(32 << 20)
            .unwrap();
        let cancel = CancellationToken::new();
        let proxy = async { run(&sockmap, b, c, Some(1 << 20), &budget, &cancel).await };
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
                let mut rest = Vec::new();
                a.read_to_end(&mut rest).unwrap();
            });
            std::thread::sleep(Duration::from_millis(1500));
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
            d.shutdown(Shutdown::Write).unwrap();
            writer.join().unwrap();
            i
        });
        let (outcome, got) = tokio::join!(proxy, ends);
        assert_eq!(got.unwrap(), N);
        let outcome = outcome.ok().expect("sockmap declined an established pair");
        assert!(matches!(outcome.end, End::Complete), "{:?}", outcome.end);
        assert_eq!(outcome.up, N);
    }
}
