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
use proxy_common::{SockLimit, SockStats, MAX_SOCKETS, SEQ_KNOWN};

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
    let len = match new_bytes(ctx, stats, len, cookie) {
        Some(len) => len,
        None => return SK_DROP,
    };
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

/// Most bytes one `bpf_skb_adjust_room` call may cut (`sk_skb_adjust_room` refuses more).
const TRIM_STEP: u32 = 0xfff;
/// Most calls for one skb: 64 steps cut 262,080 bytes, more than any one skb carries here
/// (64 KiB GSO, or a few coalesced ones).
const TRIM_STEPS: u32 = 64;

/// Trap 11: `tcp_read_skb` hands the verdict whole skbs, whatever the socket's `copied_seq`.
/// A retransmission that overlaps bytes already received (`seq < rcv_nxt < end_seq`, after a
/// lost ACK or a spurious RTO) is queued whole by `tcp_data_queue` ("partial packet ... goto
/// queue_and_out"; `tcp_ofo_queue` moves such skbs whole too), where `recvmsg` would skip the
/// old part by `copied_seq`; the verdict would forward that part a second time (seen once,
/// most likely this: 64,260 bytes, 45 segments, doubled in a 256 MiB transfer under CPU load;
/// reproduced with TCP_REPAIR in `forward::sockmap::overlap_tests`). So the verdict
/// remembers where the last skb it took ended and cuts the front of any skb that starts before
/// that. The skb's sequence numbers are `TCP_SKB_CB(skb)->seq`/`end_seq`, which `__sk_buff.cb[0]`
/// and `cb[1]` read in sk_skb programs (`sk_skb_convert_ctx_access`: `struct sk_skb_cb` starts
/// the skb's cb); where they do not add up to the skb's length (5.10 maps `cb` 8 bytes further
/// in) nothing is cut. Returns the payload length left, or `None` to drop the skb.
fn new_bytes(ctx: &SkBuffContext, stats: &mut SockStats, len: u64, cookie: u64) -> Option<u64> {
    if stats.trim_failed != 0 {
        // The stream already has a hole: nothing after it may reach the peer.
        return None;
    }
    // SAFETY: reads of the context's cb words, which every sk_skb program may read.
    let (seq, end_seq) = unsafe { ((*ctx.skb.skb).cb[0], (*ctx.skb.skb).cb[1]) };
    // An skb is at most 4 GiB (`len` is a u32 in the kernel).
    let len32 = len as u32;
    let span = end_seq.wrapping_sub(seq);
    if span != len32 && span != len32.wrapping_add(1) {
        // Not TCP sequence numbers (a FIN adds one): nothing to compare.
        return Some(len);
    }
    let end = SEQ_KNOWN | u64::from(seq.wrapping_add(len32));
    let known = stats.next_seq & SEQ_KNOWN != 0;
    let overlap = (stats.next_seq as u32).wrapping_sub(seq) as i32;
    if !known || overlap <= 0 {
        stats.next_seq = end;
        return Some(len);
    }
    let overlap = overlap as u32;
    if overlap >= len32 {
        // Nothing new (TCP drops such skbs before queueing them; never seen).
        stats.trimmed += len;
        return None;
    }
    let mut left = overlap;
    let mut steps = 0;
    while left > 0 && steps < TRIM_STEPS {
        let step = left.min(TRIM_STEP);
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            break;
        }
        left -= step;
        steps += 1;
    }
    if left != 0 {
        stats.trim_failed += 1;
        warn!(
            ctx,
            "socket {}: could not cut {} already-forwarded bytes; connection broken", cookie, left
        );
        let _ = PRESSURE.output::<u64>(cookie, 0);
        return None;
    }
    stats.trimmed += u64::from(overlap);
    stats.next_seq = end;
    debug!(
        ctx,
        "socket {}: cut {} already-forwarded bytes off a retransmission", cookie, overlap
    );
    Some(len - u64::from(overlap))
}

/// Passes the skb to the socket's own receive path (its psock ingress queue).
fn hold(stats: &mut SockStats, len: u64) -> u32 {
    stats.passed += len;
    SK_PASS
}
