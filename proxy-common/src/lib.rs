//! Types shared by spliced's eBPF program (`proxy-ebpf`) and the daemon (`proxy-user`).
//!
//! Everything here is `#[repr(C)]` and [`bytemuck::Pod`], so both sides agree on the layout of
//! map keys and values byte for byte. The `user` feature adds what only the daemon needs.
#![no_std]

use bytemuck::{Pod, Zeroable};

mod steer;
mod xdp;
pub use steer::*;
pub use xdp::*;

/// Name of the SOCKHASH that maps a source socket's cookie to the socket its bytes go to.
/// No program is attached to it: it is only the lookup table of `bpf_sk_redirect_hash`.
pub const TARGETS_MAP: &str = "TARGETS";
/// Name of the SOCKHASH whose sockets run the verdict program (key: the socket's own cookie).
pub const ACTIVE_MAP: &str = "ACTIVE";
/// Name of the hash map of per-socket [`SockStats`], keyed by socket cookie.
pub const STATS_MAP: &str = "STATS";
/// Name of the hash map of per-socket [`SockLimit`]s, keyed by socket cookie.
pub const LIMITS_MAP: &str = "LIMITS";
/// Name of the ring buffer through which the verdict reports a socket that crossed its limit:
/// each record is the socket's cookie (`u64`).
pub const PRESSURE_MAP: &str = "PRESSURE";
/// Name of the `sk_skb/stream_verdict` program.
pub const VERDICT_PROG: &str = "spliced_verdict";

/// Capacity of each socket map: two sockets per spliced connection.
pub const MAX_SOCKETS: u32 = 131_072;

/// Counters and state the verdict program keeps for one source socket (key: its socket
/// cookie). Written only by the verdict, under the socket's lock, so plain adds do not race.
///
/// The daemon creates the entry before it activates the socket and removes it when the
/// connection ends; the program only updates entries that exist.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq, Eq)]
pub struct SockStats {
    /// Payload bytes the verdict redirected from this socket to its peer.
    pub bytes: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last skb seen; 0 if none yet.
    pub last_ns: u64,
    /// Redirects the kernel refused (peer missing from the targets map). Must stay 0.
    pub failed: u64,
    /// The [`SockLimit::generation`] the verdict last reported through `PRESSURE`.
    pub reported: u64,
    /// Payload bytes the verdict *held*: passed to this socket's own receive path (its psock
    /// ingress queue, charged to its receive buffer) instead of redirecting them. The daemon
    /// reads them with `recv` and writes them to the peer itself.
    pub passed: u64,
    /// 1 while the verdict holds (every skb is passed, none redirected), else 0. The verdict
    /// starts holding when redirecting would take the socket past [`SockLimit::limit`] and goes
    /// back to redirecting only once the daemon has consumed every held byte and raised the
    /// limit: all redirected bytes come before all held ones, and back, without reordering.
    pub held: u64,
    /// The TCP sequence number just past the last payload byte the verdict took from this
    /// socket (low 32 bits), valid once [`SEQ_KNOWN`] is set; 0 before the first skb.
    pub next_seq: u64,
    /// Payload bytes the verdict cut off the front of skbs because it had taken them already:
    /// a retransmission that overlaps received bytes is queued whole (sockmap.md, trap 11).
    pub trimmed: u64,
    /// skbs whose already-taken front the kernel would not let the verdict cut off. Must stay
    /// 0: the stream is broken past that point, the verdict drops everything after it and the
    /// daemon resets the connection.
    pub trim_failed: u64,
}

/// Set in [`SockStats::next_seq`] once it holds a sequence number.
pub const SEQ_KNOWN: u64 = 1 << 32;

/// The daemon's side of one source socket's backpressure (key: its socket cookie); written only
/// by the daemon, so the verdict's [`SockStats`] are never overwritten.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq, Eq)]
pub struct SockLimit {
    /// Bound on `SockStats::bytes + consumed` (every byte moved from this socket to its peer):
    /// the daemon sets it to what the peer has taken plus the connection's allowance.
    pub limit: u64,
    /// Past this (same measure as `limit`, and below it) the verdict reports the socket through
    /// `PRESSURE`, once per generation, so the daemon refreshes the limit before it is reached
    /// while the peer keeps up.
    pub report_at: u64,
    /// Bumped by the daemon each time it sets a new limit.
    pub generation: u64,
    /// Held bytes the daemon has read and written into the peer's send queue.
    pub consumed: u64,
}

// The verdict (BPF) and the daemon (x86_64 or aarch64) must agree on these byte for byte: every
// field is a u64, so no target adds padding. Checked wherever this crate is compiled.
const _: () =
    assert!(core::mem::size_of::<SockStats>() == 72 && core::mem::align_of::<SockStats>() == 8);
const _: () =
    assert!(core::mem::size_of::<SockLimit>() == 32 && core::mem::align_of::<SockLimit>() == 8);

#[cfg(feature = "user")]
mod user {
    // SAFETY: `SockStats` is `#[repr(C)]`, has no padding and is valid for any bit pattern.
    unsafe impl aya::Pod for super::SockStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockLimit {}
    // SAFETY: the XDP front's keys and values: `#[repr(C)]`, explicit padding, any bit pattern.
    unsafe impl aya::Pod for super::XdpRouteKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::XdpRoute {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::XdpSynKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::XdpSynBucket {}
}
