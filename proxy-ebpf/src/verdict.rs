//! The verdict program: redirect every received skb to the peer socket's egress, within the
//! daemon's bound on bytes in flight (sockmap.md, trap 8).

use aya_ebpf::{
    bindings::{
        sk_action::{SK_DROP, SK_PASS},
        BPF_F_NO_PREALLOC,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{map, stream_verdict},
    maps::{HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::{debug, warn};
use proxy_common::{SockLimit, SockStats, MAX_SOCKETS};

/// Source cookie -> peer socket. Filled by the daemon for both sockets *before* either is put
/// into `ACTIVE`: a verdict that finds no target would lose the bytes (sockmap.md, trap 2).
#[map]
static TARGETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Own cookie -> socket; the verdict program is attached to this map.
#[map]
static ACTIVE: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Own cookie -> counters and hold state. Not preallocated: the daemon inserts an entry per live
/// socket, so memory follows the number of connections.
#[map]
static STATS: HashMap<u64, SockStats> = HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Own cookie -> the daemon's bound and progress (trap 8).
#[map]
static LIMITS: HashMap<u64, SockLimit> = HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Cookies of sockets past their report point or starting to hold: at most twice per limit
/// generation, so 64 KiB (4,096 records) is plenty; a full ring only delays a report until the
/// daemon's next periodic look at that connection.
#[map]
static PRESSURE: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[stream_verdict]
pub fn spliced_verdict(ctx: SkBuffContext) -> u32 {
    verdict(&ctx)
}

fn verdict(ctx: &SkBuffContext) -> u32 {
    // SAFETY: the helper only reads the skb's socket; the pointer is the program's context.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let len = u64::from(ctx.len());
    if len == 0 {
        // Trap 1: a FIN arrives as a zero-length skb. Redirected, the peer's backlog send
        // returns 0, which the kernel treats as fatal (EPIPE on the peer, its forwarding
        // stopped). Passed to this socket, it is just as fatal whenever it has to go through
        // this socket's own backlog (that is, when redirected bytes for this socket are still
        // queued there): a zero-length ingress also returns 0, and this socket gets EPIPE and
        // stops taking redirects. Measured: 5 of 6,000 short connections reset. Drop it: TCP
        // has already recorded the FIN (RCV_SHUTDOWN, rcv_nxt), recv() still reports EOF, and
        // the daemon learns of it from EPOLLRDHUP and shuts the peer down itself.
        debug!(ctx, "socket {}: zero-length skb (FIN) dropped", cookie);
        return SK_DROP;
    }
    let Some(stats) = STATS.get_ptr_mut(cookie) else {
        // Not a socket the daemon set up fully (cannot happen: STATS is filled before ACTIVE).
        return TARGETS.redirect_skb(ctx, &mut cookie, 0) as u32;
    };
    // SAFETY: a pointer into a map value that lives as long as the entry. Only this socket's
    // receive path writes it, under the socket lock, so plain read-modify-writes do not race.
    let stats = unsafe { &mut *stats };
    // SAFETY: ktime has no preconditions.
    stats.last_ns = unsafe { bpf_ktime_get_ns() };
    let limit = LIMITS
        .get_ptr(cookie)
        // SAFETY: as above; the daemon replaces the value whole, each field is read once.
        .map(|l| unsafe { *l })
        .unwrap_or(SockLimit {
            limit: u64::MAX,
            report_at: u64::MAX,
            generation: 0,
            consumed: 0,
        });
    let moved = stats.bytes + limit.consumed + len;
    if moved > limit.report_at && stats.reported != limit.generation {
        // Half-way: ask the daemon for a fresh limit while there is room left.
        stats.reported = limit.generation;
        let _ = PRESSURE.output::<u64>(cookie, 0);
    }
    let within = moved <= limit.limit;
    if stats.held != 0 {
        // Back to redirecting only when every held byte is in the peer's send queue (nothing of
        // ours is still in this socket's ingress queue) and the daemon made room.
        if limit.consumed != stats.passed || !within {
            return hold(stats, len);
        }
        stats.held = 0;
    } else if !within {
        // Trap 8: redirected bytes wait in the peer's backlog, charged to no socket, and
        // nothing stalls the sender. Hold them on this socket instead: they count against its
        // receive buffer, its window closes, and TCP flow control stalls the sender.
        stats.held = 1;
        let _ = PRESSURE.output::<u64>(cookie, 0);
        return hold(stats, len);
    }
    if TARGETS.redirect_skb(ctx, &mut cookie, 0) as u32 == SK_PASS {
        stats.bytes += len;
        return SK_PASS;
    }
    // No peer in TARGETS: keep the bytes on this socket, in order, for the daemon to copy.
    stats.failed += 1;
    warn!(
        ctx,
        "socket {}: no peer in TARGETS, {} bytes held on the source", cookie, len
    );
    stats.held = 1;
    let _ = PRESSURE.output::<u64>(cookie, 0);
    hold(stats, len)
}

/// Passes the skb to the socket's own receive path (its psock ingress queue).
fn hold(stats: &mut SockStats, len: u64) -> u32 {
    stats.passed += len;
    SK_PASS
}
