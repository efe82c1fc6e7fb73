//! The verdict program: redirect every received skb to the peer socket's egress.

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_NO_PREALLOC},
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

/// Own cookie -> counters, kept for logs, metrics and backpressure. Not preallocated: the
/// daemon inserts an entry per live socket, so memory follows the number of connections.
#[map]
static STATS: HashMap<u64, SockStats> = HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Own cookie -> the daemon's backpressure limit (sockmap.md, trap 8).
#[map]
static LIMITS: HashMap<u64, SockLimit> = HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Cookies of sockets whose redirected bytes crossed their limit. Each live socket reports at
/// most once per limit generation, so 64 KiB (4,096 records) is plenty; a full ring only delays
/// a report until the daemon's next look at that connection.
#[map]
static PRESSURE: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[stream_verdict]
pub fn spliced_verdict(ctx: SkBuffContext) -> u32 {
    try_verdict(&ctx).unwrap_or(SK_PASS)
}

fn try_verdict(ctx: &SkBuffContext) -> Result<u32, i64> {
    // SAFETY: the helper only reads the skb's socket; the pointer is the program's context.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let len = ctx.len();
    if len == 0 {
        // Trap 1: a FIN arrives as a zero-length skb. Redirected, the peer's backlog send would
        // return 0, which the kernel treats as fatal (EPIPE on the peer). Keep it here; the
        // daemon learns of EOF from EPOLLRDHUP and shuts the peer down itself.
        debug!(
            ctx,
            "socket {}: zero-length skb (FIN) kept, not redirected", cookie
        );
        return Ok(SK_PASS);
    }
    let stats = STATS.get_ptr_mut(&cookie);
    let verdict = TARGETS.redirect_skb(ctx, &mut cookie, 0) as u32;
    if let Some(stats) = stats {
        // SAFETY: a pointer into a map value that lives as long as the entry. Only this socket's
        // receive path writes it, under the socket lock, so plain adds do not race.
        unsafe {
            if verdict == SK_PASS {
                (*stats).bytes += u64::from(len);
                (*stats).last_ns = bpf_ktime_get_ns();
                // Trap 8: the peer's backlog is charged to no socket and nothing stalls the
                // sender. Tell the daemon when this socket has run ahead of its limit; it pauses
                // the socket (out of ACTIVE: its bytes then wait in its own receive queue, and
                // TCP flow control stalls the sender) until the peer catches up.
                if let Some(limit) = LIMITS.get(&cookie) {
                    if (*stats).bytes > limit.limit && (*stats).reported != limit.generation {
                        (*stats).reported = limit.generation;
                        let _ = PRESSURE.output::<u64>(cookie, 0);
                    }
                }
            } else {
                (*stats).failed += 1;
            }
        }
    }
    if verdict != SK_PASS {
        warn!(
            ctx,
            "socket {}: no peer in TARGETS, {} bytes kept on the source", cookie, len
        );
        // Keep the bytes in the source's own queue rather than dropping them.
        return Ok(SK_PASS);
    }
    Ok(verdict)
}
