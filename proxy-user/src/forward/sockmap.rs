//! The sockmap data path: after set-up no payload crosses into userspace, except bytes held back
//! for backpressure. The daemon watches for FIN and RST and carries them across, in the order
//! the traps of sockmap.md demand.
//!
//! # Backpressure (trap 8)
//! A redirected byte leaves the source's receive queue at once and waits in the peer's psock
//! backlog, charged to no socket: with a peer that does not read, the sender is never stalled.
//! So each direction gets an allowance (route `max_buffered`, reserved from the global
//! `max_buffered_total`). The verdict program counts what it redirected; once redirecting an skb
//! would take the direction past `what the peer has taken + allowance`, it *holds*: it passes
//! this and every later skb to the source socket's own receive path (its psock ingress queue)
//! instead. Held bytes are charged to the source's receive buffer, so its window closes and TCP
//! flow control stalls the sender, exactly as through splice. The daemon, woken through a ring
//! buffer, waits until the peer has taken everything redirected so far, then reads the held bytes
//! with `recv` and writes them to the peer itself, and raises the limit. The verdict goes back to
//! redirecting only when the daemon has written every held byte (`consumed == passed`), so all
//! redirected bytes precede all held ones and back again: nothing is reordered.
//!
//! Kernel behaviour this relies on, each checked by the start-up probe or the tests here: a
//! verdict's `SK_PASS` on a socket in a sockmap queues the skb on the socket's psock ingress list
//! (`sk_psock_skb_ingress_self`), charged with `skb_set_owner_r`, so `tcp_space()` and with it the
//! advertised window shrink; over `sk_rcvbuf` the psock retries from its backlog worker, so at
//! most one more window arrives; `recv` (tcp_bpf_recvmsg) returns the ingress list in order.
//!
//! What is never done: taking an active socket out of the `ACTIVE` map while bytes may arrive.
//! `sock_map_del_link` clears the psock's verdict without the socket lock, and an skb that
//! `tcp_read_skb` already dequeued then meets no program and is dropped (seen here: 265 KB lost
//! of 256 MiB under CPU contention, with an earlier remove-to-pause design).
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
use tokio_util::sync::CancellationToken;

use super::{End, Outcome};
use crate::{
    sockmap::{flush_early_bytes, Activation, InsertError, Pair, Sockmap},
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

/// Bytes `src` has received (less its FIN) that are not yet in `dst`'s send queue: in flight
/// through the verdict, waiting in `dst`'s psock backlog, or held on `src`.
///
/// Trap 6: shutting `dst` down, or removing it from the maps, while its backlog holds bytes
/// drops them (a prototype lost 9.9 MB of 1 GiB). Every byte `src` received goes to `dst`, by the
/// verdict or by the daemon, so `dst` has everything when
/// `src.bytes_received - FIN == dst.bytes_acked - SYN(if dst called connect()) + SIOCOUTQ(dst)`.
fn undelivered(
    src: &TcpStream,
    src_fin: bool,
    dst: &TcpStream,
    dst_connected: bool,
) -> io::Result<u64> {
    let s = sockopt::tcp_info(src)?;
    let received = s.bytes_received - u64::from(src_fin && s.bytes_received > 0);
    Ok(received.saturating_sub(written(dst, dst_connected)?))
}

/// Bytes that have entered `dst`'s send queue (acknowledged or still queued).
fn written(dst: &TcpStream, dst_connected: bool) -> io::Result<u64> {
    let d = sockopt::tcp_info(dst)?;
    Ok((d.bytes_acked + sockopt::outq(dst)?).saturating_sub(u64::from(dst_connected)))
}

/// Polling interval bounds while a backlog drains or held bytes wait. The backlog has no wakeup
/// of its own: while the destination's send buffer is full the kernel retries it once a jiffy
/// (trap 9).
const POLL_MIN: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(50);
/// Looks without a timer while a FIN waits for a short backlog, before polling on the timer.
const FIN_SPINS: u32 = 16;

/// Userspace copy buffer for held bytes, and the most one look copies.
const COPY_BUF: usize = 256 * 1024;
const COPY_MAX_PER_LOOK: usize = 64;
/// Most read-write-publish rounds in one look while the verdict holds.
const RESUME_ROUNDS: usize = 32;
/// The receive window of a held source while the daemon hands it back to the verdict: two
/// full-size segments on loopback and veth, so the window never drops to zero (a zero window
/// would make the sender wait for a zero-window probe, 200 ms or more).
const HANDBACK_WINDOW: i32 = 128 * 1024;

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
    /// Bytes written into `dst` before the sockets joined sockmap (by the copy path, for a
    /// promoted connection): not the verdict's, and not part of its counts.
    base: u64,
    /// This direction's share of the global pool.
    grant: u64,
    generation: u64,
    /// `src` runs the verdict. False only for an upstream that closed before it could be
    /// activated: its bytes are all copied by the daemon.
    active: bool,
    /// Bytes the daemon read from `src` and wrote into `dst`.
    consumed: u64,
    /// Read from `src`, not yet accepted by `dst`.
    pending: Vec<u8>,
    pending_from: usize,
    /// `src`'s own window clamp, while the daemon narrows the window to hand back to the verdict.
    clamped: Option<i32>,
    /// Whether the last look found work for the daemon (held or pending bytes, or an inactive
    /// source): the connection then polls instead of sleeping until the next event.
    busy: bool,
    /// `src`'s FIN has been forwarded as `dst`'s.
    done: bool,
}

impl Direction<'_> {
    /// Bytes that entered `dst`'s send queue since the sockets joined sockmap, counted like
    /// the verdict's `bytes` plus the daemon's `consumed`.
    fn written(&self) -> io::Result<u64> {
        Ok(written(self.dst, self.dst_connected)?.saturating_sub(self.base))
    }

    /// Tells the verdict what the daemon has written and how far it may go: the peer's progress
    /// plus the allowance.
    fn publish(&mut self, sockmap: &Sockmap) -> io::Result<()> {
        self.generation += 1;
        let written = self.written()?;
        // The next report a quarter of the allowance from here, or from what the verdict has
        // moved already if the peer's backlog is behind: a report point below that would fire
        // at the very next skb, and each report would only lead to the next (measured: 3,000
        // reports a second in a download, 10% of a core).
        let moved = sockmap.stats(self.src_cookie).bytes + self.consumed;
        let limit = written + self.grant;
        let limit = SockLimit {
            limit,
            report_at: (written.max(moved) + self.grant / 4).min(limit),
            generation: self.generation,
            consumed: self.consumed,
        };
        sockmap
            .set_limit(self.src_cookie, limit)
            .map_err(io::Error::other)
    }

    /// One look at this direction: copies held bytes once the peer has taken everything
    /// redirected before them, and forwards the FIN once everything before it is in `dst`.
    fn service(&mut self, sockmap: &Sockmap, src_eof: bool) -> io::Result<bool> {
        if self.done {
            self.busy = false;
            return Ok(false);
        }
        let mut progress = false;
        let mut stats = sockmap.stats(self.src_cookie);
        if self.active && stats.held == 0 && self.pending_from == self.pending.len() {
            self.unclamp()?;
            self.busy = false;
            // The copy buffer only lives while the daemon copies.
            self.pending = Vec::new();
            self.pending_from = 0;
            if stats.reported == self.generation {
                // Half-way to the limit while the peer keeps up: move the limit on, so that a
                // connection nobody stalls never holds.
                self.publish(sockmap)?;
            }
        } else {
            self.busy = true;
            // The verdict redirects again only if no skb arrived between the daemon's last read
            // and its publishing `consumed`; at line rate that takes a few tight rounds, not
            // one per poll interval.
            for _ in 0..RESUME_ROUNDS {
                // Held bytes go out only after every redirected byte is in dst's queue: they
                // come after them in the stream. (While held, the verdict redirects nothing.)
                let before = stats.bytes + self.consumed;
                if self.active && self.written()? < before {
                    break;
                }
                if self.active && self.clamped.is_none() {
                    // The verdict redirects again only at an skb that finds every held byte
                    // written. While the sender refills each window the daemon's reads open,
                    // that moment never comes: narrow the window (and stop receive autotuning,
                    // which would widen it again on the next recv) until the hand-back is done.
                    let clamp = sockopt::window_clamp(self.src)?;
                    sockopt::lock_receive_buffer(self.src)?;
                    sockopt::set_window_clamp(self.src, HANDBACK_WINDOW)?;
                    self.clamped = Some(clamp);
                }
                // Held bytes end at `passed`; an inactive source's at its FIN.
                let end = if self.active { stats.passed } else { u64::MAX };
                let copied = self.copy(end)?;
                progress |= copied > 0;
                if !self.active {
                    break;
                }
                self.publish(sockmap)?;
                stats = sockmap.stats(self.src_cookie);
                if stats.held == 0 && self.pending_from == self.pending.len() {
                    self.unclamp()?;
                    self.busy = false;
                    break;
                }
                if copied == 0 {
                    // Nothing readable yet, or dst is full: wait for the next look.
                    break;
                }
            }
        }
        if src_eof && self.pending_from == self.pending.len() {
            let left = undelivered(self.src, true, self.dst, self.dst_connected)?;
            if left == 0 {
                sockopt::shutdown_write(self.dst)?;
                self.done = true;
                self.busy = false;
                progress = true;
            }
        }
        Ok(progress)
    }

    fn unclamp(&mut self) -> io::Result<()> {
        if let Some(clamp) = self.clamped.take() {
            sockopt::set_window_clamp(self.src, clamp)?;
        }
        Ok(())
    }

    /// Moves bytes from `src` to `dst` without blocking, reading no further than stream offset
    /// `end` (counted like `consumed`); returns how many reached `dst`. Never past `end`: bytes
    /// after the held ones were redirected by the verdict and are not this copy's to move.
    fn copy(&mut self, end: u64) -> io::Result<u64> {
        let mut moved = 0u64;
        let mut read = self.consumed + (self.pending.len() - self.pending_from) as u64;
        for _ in 0..COPY_MAX_PER_LOOK {
            if self.pending_from == self.pending.len() {
                let want = end.saturating_sub(read).min(COPY_BUF as u64) as usize;
                if want == 0 {
                    break;
                }
                // Read into spare capacity: zeroing 256 KiB per read showed in the profile.
                self.pending.clear();
                self.pending.reserve(want);
                self.pending_from = 0;
                let spare = &mut self.pending.spare_capacity_mut()[..want];
                match sockopt::recv_nonblocking_uninit(self.src.as_raw_fd(), spare)? {
                    Some(0) | None => break,
                    Some(n) => {
                        // SAFETY: recv initialised the first `n` bytes of the spare capacity.
                        unsafe { self.pending.set_len(n) };
                        read += n as u64;
                    }
                }
            }
            match sockopt::send_nonblocking(
                self.dst.as_raw_fd(),
                &self.pending[self.pending_from..],
            )? {
                Some(n) => {
                    self.pending_from += n;
                    self.consumed += n as u64;
                    moved += n as u64;
                }
                None => break,
            }
        }
        if self.pending_from == self.pending.len() {
            self.pending.clear();
            self.pending_from = 0;
        }
        Ok(moved)
    }
}

/// Forwards `client` <-> `upstream` in the kernel until both sides have closed, one fails, or
/// `cancel` fires. Returns the sockets back if sockmap cannot take them.
pub async fn run(
    sockmap: &Sockmap,
    client: TcpStream,
    upstream: TcpStream,
    send_buffer: Option<usize>,
    budget: &Budget,
    carried: (u64, u64),
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
                return Ok(abort(
                    &client,
                    &upstream,
                    None,
                    sockmap,
                    (0, 0),
                    End::Ours(e),
                ));
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
        Err(e) => {
            return Ok(abort(
                &client,
                &upstream,
                None,
                sockmap,
                (0, 0),
                End::Ours(e),
            ))
        }
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
    let result = splice_pair(
        sockmap,
        &watch,
        &client,
        &upstream,
        &pair,
        (grants, carried),
        cancel,
    )
    .await;
    // The epoll registrations go before the sockets close: `EPOLL_CTL_DEL` names an fd number,
    // and once closed that number may already belong to another connection's new socket,
    // whose registration it would delete (its FIN would then never be reported).
    drop(watch);
    result.map_err(|why| Declined {
        client,
        upstream,
        why,
    })
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
    client: &TcpStream,
    upstream: &TcpStream,
    pair: &Pair,
    (grants, carried): ([u64; 2], (u64, u64)),
    cancel: &CancellationToken,
) -> Result<Outcome, InsertError> {
    // No bound while the early bytes are flushed (trap 3): a hold during the flush would make
    // its one-byte recv return payload. The real limits follow right after.
    let activation = match sockmap.insert(pair, None) {
        Ok(a) => a,
        // Nothing was ever active: the sockets are untouched, a userspace path takes them.
        Err(why) => return Err(why),
    };
    let mut up = Direction {
        src: client,
        src_cookie: pair.client_cookie,
        dst: upstream,
        dst_connected: true,
        base: carried.0,
        grant: grants[0],
        generation: 1,
        active: true,
        consumed: 0,
        pending: Vec::new(),
        pending_from: 0,
        clamped: None,
        busy: false,
        done: false,
    };
    let mut down = Direction {
        src: upstream,
        src_cookie: pair.upstream_cookie,
        dst: client,
        dst_connected: false,
        base: carried.1,
        grant: grants[1],
        generation: 1,
        active: activation == Activation::Both,
        consumed: 0,
        pending: Vec::new(),
        pending_from: 0,
        clamped: None,
        busy: false,
        done: false,
    };
    // Trap 3: bytes that arrived before activation sit in the receive queues until flushed.
    // A reset that arrived meanwhile fails the flush's recv: that is the source's peer failing
    // (seen under QEMU, where set-up can take longer than a whole exchange), not spliced.
    let up_failed: fn(io::Error) -> End = End::ClientFailed;
    for (d, source_failed) in [(&up, up_failed), (&down, End::UpstreamFailed)] {
        if d.active {
            if let Err(e) = flush_early_bytes(d.src.as_raw_fd()) {
                return Ok(abort(
                    client,
                    upstream,
                    Some(pair),
                    sockmap,
                    (0, 0),
                    classify(e, source_failed),
                ));
            }
        }
    }
    if let Err(e) = up.publish(sockmap).and_then(|()| down.publish(sockmap)) {
        return Ok(abort(
            client,
            upstream,
            Some(pair),
            sockmap,
            (0, 0),
            End::Ours(e),
        ));
    }
    if !down.active {
        tracing::debug!("upstream closed before activation: its bytes are copied in userspace");
    }

    let mut poll_interval = POLL_MIN;
    let mut spins = 0;
    let end = loop {
        let (c, u) = match (poll_state(pair.client), poll_state(pair.upstream)) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => break End::Ours(e),
        };
        if c.error {
            break End::ClientFailed(socket_error(client));
        }
        if u.error {
            break End::UpstreamFailed(socket_error(upstream));
        }
        let progress = match (up.service(sockmap, c.eof), down.service(sockmap, u.eof)) {
            (Ok(a), Ok(b)) => a || b,
            (Err(e), _) => break classify(e, End::UpstreamFailed),
            (_, Err(e)) => break classify(e, End::ClientFailed),
        };
        if up.done && down.done {
            break End::Complete;
        }
        if progress {
            poll_interval = POLL_MIN;
        }
        let fin_waiting = (c.eof && !up.done) || (u.eof && !down.done);
        let waiting = fin_waiting || up.busy || down.busy;
        if fin_waiting && !up.busy && !down.busy && spins < FIN_SPINS {
            // A FIN waits for the last bytes to leave the peer's backlog, which takes
            // microseconds when they are few: look again after the other tasks had their turn
            // rather than after the 1 ms a timer takes at least (that millisecond halved the
            // short connections per second).
            spins += 1;
            tokio::task::yield_now().await;
            continue;
        }
        spins = 0;
        tokio::select! {
            () = watch.changed() => poll_interval = POLL_MIN,
            () = tokio::time::sleep(poll_interval), if waiting => {
                poll_interval = (poll_interval * 2).min(POLL_MAX);
            }
            () = cancel.cancelled() => break End::Shutdown,
        }
    };
    let consumed = (up.consumed, down.consumed);
    tracing::debug!(
        held_up = up.consumed,
        held_down = down.consumed,
        limits_up = up.generation,
        limits_down = down.generation,
        "sockmap connection done"
    );
    Ok(match end {
        End::Complete => {
            let outcome = counted(sockmap, pair, consumed, End::Complete);
            // Both sides sent their FIN and both backlogs are empty (checked before each
            // shutdown): no byte can arrive any more, removal loses nothing. The sockets close
            // when `run` returns, which takes them out of the sockhashes.
            sockmap.forget(pair);
            outcome
        }
        end => abort(client, upstream, Some(pair), sockmap, consumed, end),
    })
}

/// Errors of a write to the peer are the peer's failure; anything else is ours.
fn classify(e: io::Error, peer_failed: fn(io::Error) -> End) -> End {
    match e.raw_os_error() {
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::ETIMEDOUT) => peer_failed(e),
        _ => End::Ours(e),
    }
}

fn counted(sockmap: &Sockmap, pair: &Pair, consumed: (u64, u64), end: End) -> Outcome {
    Outcome {
        up: sockmap.stats(pair.client_cookie).bytes + consumed.0,
        down: sockmap.stats(pair.upstream_cookie).bytes + consumed.1,
        end,
    }
}

/// Ends the connection with an RST to both sides.
fn abort(
    client: &TcpStream,
    upstream: &TcpStream,
    pair: Option<&Pair>,
    sockmap: &Sockmap,
    consumed: (u64, u64),
    end: End,
) -> Outcome {
    let outcome = match pair {
        Some(pair) => {
            let o = counted(sockmap, pair, consumed, end);
            // Both are reset and closed right after.
            sockmap.forget(pair);
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
        let proxy = async { run(&sockmap, b, c, Some(16 << 20), &budget, (0, 0), &cancel).await };
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
        let proxy = async { run(&sockmap, b, c, Some(16 << 20), &budget, (0, 0), &cancel).await };
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
        let proxy = async { run(&sockmap, b, c, Some(1 << 20), &budget, (0, 0), &cancel).await };
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
