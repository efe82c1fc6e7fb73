//! One direction of a sockmap connection: what the verdict redirected, what the daemon holds
//! back and copies itself (trap 8), and when the source's FIN may follow (trap 6).
use std::{io, net::TcpStream, os::fd::AsRawFd};

use proxy_common::SockLimit;

use crate::{ebpf::Sockmap, sockopt};

/// What userspace moved before the sockets joined sockmap: the bytes it read from `src` (a
/// front proxy's PROXY header, the routing peek, the copy path) and the bytes it wrote into
/// `dst` (our PROXY header, the peeked bytes, the copy path). The two differ by the headers, so
/// neither can stand for the other in the FIN check (trap 6): with a front proxy's header read
/// and dropped, `src` always looked ahead by its length and the client's FIN never went out.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Before {
    pub(super) consumed: u64,
    pub(super) written: u64,
}

/// Looks at most this often for a moment when no byte arrives between two reads of `src`'s
/// counters.
const STABLE_TRIES: usize = 256;

/// Measures [`Before`] for `src` -> `dst`, before the insert: nothing but userspace has moved a
/// byte yet. `consumed` is `bytes_received - SIOCINQ` (less the FIN if it has arrived), read
/// between two identical `bytes_received`, so that no byte arrived in between.
pub(super) fn before_join(
    src: &TcpStream,
    dst: &TcpStream,
    dst_connected: bool,
) -> io::Result<Before> {
    let written = written(dst, dst_connected)?;
    for _ in 0..STABLE_TRIES {
        let received = sockopt::tcp_info(src)?.bytes_received;
        let fin = super::poll_state(src.as_raw_fd())?.eof;
        let queued = sockopt::inq(src)?;
        if sockopt::tcp_info(src)?.bytes_received == received {
            let consumed = received.saturating_sub(queued + u64::from(fin && received > 0));
            return Ok(Before { consumed, written });
        }
    }
    Err(io::Error::other(
        "bytes kept arriving while the counters were read",
    ))
}

/// Bytes that have entered `dst`'s send queue (acknowledged or still queued).
fn written(dst: &TcpStream, dst_connected: bool) -> io::Result<u64> {
    let d = sockopt::tcp_info(dst)?;
    Ok((d.bytes_acked + sockopt::outq(dst)?).saturating_sub(u64::from(dst_connected)))
}

/// Userspace copy buffer for held bytes, and the most one look copies.
const COPY_BUF: usize = 256 * 1024;
const COPY_MAX_PER_LOOK: usize = 64;
/// Most read-write-publish rounds in one look while the verdict holds.
const RESUME_ROUNDS: usize = 32;
/// The receive window of a held source while the daemon hands it back to the verdict: two
/// full-size segments on loopback and veth, so the window never drops to zero (a zero window
/// would make the sender wait for a zero-window probe, 200 ms or more).
const HANDBACK_WINDOW: i32 = 128 * 1024;

/// One direction of a sockmap connection: the bytes `src` receives go to `dst`.
pub(super) struct Direction<'a> {
    pub(super) src: &'a TcpStream,
    pub(super) src_cookie: u64,
    pub(super) dst: &'a TcpStream,
    /// `dst` called connect(): its `bytes_acked` counts the SYN.
    pub(super) dst_connected: bool,
    /// What userspace moved before the join: not the verdict's, and not part of its counts.
    pub(super) before: Before,
    /// This direction's share of the global pool.
    pub(super) grant: u64,
    pub(super) generation: u64,
    /// `src` runs the verdict. False only for an upstream that closed before it could be
    /// activated: its bytes are all copied by the daemon.
    pub(super) active: bool,
    /// Bytes the daemon read from `src` and wrote into `dst`.
    pub(super) consumed: u64,
    /// Read from `src`, not yet accepted by `dst`.
    pub(super) pending: Vec<u8>,
    pub(super) pending_from: usize,
    /// `src`'s own window clamp, while the daemon narrows the window to hand back to the verdict.
    pub(super) clamped: Option<i32>,
    /// Whether the last look found work for the daemon (held or pending bytes, or an inactive
    /// source): the connection then polls instead of sleeping until the next event.
    pub(super) busy: bool,
    /// `src`'s FIN has been forwarded as `dst`'s.
    pub(super) done: bool,
}

impl<'a> Direction<'a> {
    /// A direction that starts with nothing held: `before` was moved before the sockets joined
    /// sockmap, `grant` is its share of the global pool.
    pub(super) fn new(
        (src, src_cookie): (&'a TcpStream, u64),
        (dst, dst_connected): (&'a TcpStream, bool),
        before: Before,
        grant: u64,
        active: bool,
    ) -> Self {
        Direction {
            src,
            src_cookie,
            dst,
            dst_connected,
            before,
            grant,
            generation: 1,
            active,
            consumed: 0,
            pending: Vec::new(),
            pending_from: 0,
            clamped: None,
            busy: false,
            done: false,
        }
    }
}

impl Direction<'_> {
    /// Bytes that entered `dst`'s send queue since the sockets joined sockmap, counted like
    /// the verdict's `bytes` plus the daemon's `consumed`.
    pub(super) fn written(&self) -> io::Result<u64> {
        Ok(written(self.dst, self.dst_connected)?.saturating_sub(self.before.written))
    }

    /// Bytes `src` has received since the join (less its FIN) that are not yet in `dst`'s send
    /// queue: in flight through the verdict, waiting in `dst`'s psock backlog, or held on `src`.
    ///
    /// Trap 6: shutting `dst` down, or removing it from the maps, while its backlog holds bytes
    /// drops them (a prototype lost 9.9 MB of 1 GiB). Every byte `src` receives goes to `dst`,
    /// by the verdict or by the daemon, so `dst` has everything when, counted from the join,
    /// `src.bytes_received - FIN == dst.bytes_acked - SYN(if dst called connect()) +
    /// SIOCOUTQ(dst)`.
    fn undelivered(&self, src_fin: bool) -> io::Result<u64> {
        let s = sockopt::tcp_info(self.src)?;
        let received = s.bytes_received - u64::from(src_fin && s.bytes_received > 0);
        let received = received.saturating_sub(self.before.consumed);
        Ok(received.saturating_sub(self.written()?))
    }

    /// Tells the verdict what the daemon has written and how far it may go: the peer's progress
    /// plus the allowance.
    pub(super) fn publish(&mut self, sockmap: &Sockmap) -> io::Result<()> {
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
    pub(super) fn service(&mut self, sockmap: &Sockmap, src_eof: bool) -> io::Result<bool> {
        if self.done {
            self.busy = false;
            return Ok(false);
        }
        let mut progress = false;
        let mut stats = sockmap.stats(self.src_cookie);
        if stats.trim_failed != 0 {
            // Trap 11: the verdict could not cut an already-forwarded front off an skb and
            // drops everything from there on; the connection cannot go on without a hole.
            return Err(io::Error::other(
                "the kernel handed the verdict bytes it had forwarded already and would not let \
                 it cut them off (sockmap.md, trap 11); the connection is reset",
            ));
        }
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
            let left = self.undelivered(true)?;
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
                self.pending.clear();
                self.pending_from = 0;
                match sockopt::recv_append(self.src.as_raw_fd(), &mut self.pending, want)? {
                    Some(0) | None => break,
                    Some(n) => read += n as u64,
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
