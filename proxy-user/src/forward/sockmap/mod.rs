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
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use super::{End, Outcome};
use crate::{
    ebpf::{flush_early_bytes, Activation, InsertError, Pair, Sockmap, Watch},
    sockopt,
};

mod direction;
mod pool;

use direction::Direction;
use pool::Reservation;
pub use pool::{Budget, Pool};

/// Polling interval bounds while a backlog drains or held bytes wait. The backlog has no wakeup
/// of its own: while the destination's send buffer is full the kernel retries it once a jiffy
/// (trap 9).
const POLL_MIN: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(50);
/// Looks without a timer while a FIN waits for a short backlog, before polling on the timer.
const FIN_SPINS: u32 = 16;

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

/// A connection sockmap would not take; hand it to a userspace path.
pub struct Declined {
    pub client: TcpStream,
    pub upstream: TcpStream,
    pub why: InsertError,
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
    let watched = (|| {
        let pair = Pair {
            client: client.as_raw_fd(),
            client_cookie: sockopt::cookie(&client)?,
            upstream: upstream.as_raw_fd(),
            upstream_cookie: sockopt::cookie(&upstream)?,
        };
        let watch = sockmap.watcher().watch(&[
            (pair.client, pair.client_cookie),
            (pair.upstream, pair.upstream_cookie),
        ])?;
        Ok::<_, io::Error>((pair, watch))
    })();
    let (pair, watch) = match watched {
        Ok(w) => w,
        Err(e) => {
            let outcome = abort(&client, &upstream, None, sockmap, (0, 0), End::Ours(e));
            return Ok(outcome);
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
    let joined = Joined {
        sockmap,
        watch: &watch,
        client: &client,
        upstream: &upstream,
        pair: &pair,
    };
    let result = splice_pair(joined, grants, cancel).await;
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

/// The two sockets of a connection in the sockmap, with their watch.
#[derive(Clone, Copy)]
struct Joined<'a> {
    sockmap: &'a Sockmap,
    watch: &'a Watch,
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    pair: &'a Pair,
}

async fn splice_pair(
    joined: Joined<'_>,
    grants: [u64; 2],
    cancel: &CancellationToken,
) -> Result<Outcome, InsertError> {
    let Joined {
        sockmap,
        client,
        upstream,
        pair,
        ..
    } = joined;
    // No bound while the early bytes are flushed (trap 3): a hold during the flush would make
    // its one-byte recv return payload. The real limits follow right after.
    // An error here: nothing was ever active, the sockets are untouched, a userspace path
    // takes them.
    // Measured before the insert, while only userspace has moved bytes.
    let before = direction::before_join(client, upstream, true)
        .and_then(|up| Ok((up, direction::before_join(upstream, client, false)?)));
    // A failure leaves the sockets untouched, for a userspace path.
    let (before_up, before_down) = before.map_err(InsertError::Unsettled)?;
    let activation = sockmap.insert(pair, None)?;
    let mut up = Direction::new(
        (client, pair.client_cookie),
        (upstream, true),
        before_up,
        grants[0],
        true,
    );
    let mut down = Direction::new(
        (upstream, pair.upstream_cookie),
        (client, false),
        before_down,
        grants[1],
        activation == Activation::Both,
    );
    if let Err(end) = start(sockmap, &mut up, &mut down) {
        return Ok(abort(client, upstream, Some(pair), sockmap, (0, 0), end));
    }
    let end = follow(&joined, &mut up, &mut down, cancel).await;
    let consumed = (up.consumed, down.consumed);
    tracing::debug!(
        held_up = up.consumed,
        held_down = down.consumed,
        // Bytes of retransmissions the verdict had forwarded already (trap 11).
        trimmed_up = sockmap.stats(pair.client_cookie).trimmed,
        trimmed_down = sockmap.stats(pair.upstream_cookie).trimmed,
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

/// Flushes what arrived before activation and sets the directions' first limits.
fn start(sockmap: &Sockmap, up: &mut Direction, down: &mut Direction) -> Result<(), End> {
    // Trap 3: bytes that arrived before activation sit in the receive queues until flushed.
    // A reset that arrived meanwhile fails the flush's recv: that is the source's peer failing
    // (seen under QEMU, where set-up can take longer than a whole exchange), not spliced.
    let up_failed: fn(io::Error) -> End = End::ClientFailed;
    for (d, source_failed) in [(&*up, up_failed), (&*down, End::UpstreamFailed)] {
        if d.active {
            flush_early_bytes(d.src.as_raw_fd()).map_err(|e| classify(e, source_failed))?;
        }
    }
    up.publish(sockmap)
        .and_then(|()| down.publish(sockmap))
        .map_err(End::Ours)?;
    if !down.active {
        tracing::debug!("upstream closed before activation: its bytes are copied in userspace");
    }
    Ok(())
}

/// Carries FINs, resets and held bytes until the connection ends.
async fn follow(
    joined: &Joined<'_>,
    up: &mut Direction<'_>,
    down: &mut Direction<'_>,
    cancel: &CancellationToken,
) -> End {
    let Joined {
        sockmap,
        watch,
        client,
        upstream,
        pair,
    } = *joined;
    let mut poll_interval = POLL_MIN;
    let mut spins = 0;
    loop {
        let (c, u) = match (poll_state(pair.client), poll_state(pair.upstream)) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => return End::Ours(e),
        };
        if c.error {
            return End::ClientFailed(socket_error(client));
        }
        if u.error {
            return End::UpstreamFailed(socket_error(upstream));
        }
        let progress = match (up.service(sockmap, c.eof), down.service(sockmap, u.eof)) {
            (Ok(a), Ok(b)) => a || b,
            (Err(e), _) => return classify(e, End::UpstreamFailed),
            (_, Err(e)) => return classify(e, End::ClientFailed),
        };
        if up.done && down.done {
            return End::Complete;
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
            () = cancel.cancelled() => return End::Shutdown,
        }
    }
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
mod overlap_tests;
#[cfg(test)]
mod tests;
