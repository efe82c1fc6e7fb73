//! Map keys and values of the XDP front (`proxy-ebpf/src/xdp.rs`), the second eBPF object.
//!
//! Every address is 16 bytes: IPv6 as is, IPv4 as an IPv4-mapped IPv6 address
//! (`::ffff:a.b.c.d`), so one key type and one trie per list serve both families.
use bytemuck::{Pod, Zeroable};

/// Name of the XDP program in the `proxy-xdp` object (section `xdp`).
pub const XDP_PROG: &str = "spliced_xdp";
/// Name of the same program marked `frags` (section `xdp.frags`, Linux 5.18).
pub const XDP_PROG_FRAGS: &str = "spliced_xdp_frags";
/// Name of the hash map [`XdpRouteKey`] -> [`XdpRoute`]: every route's listen address and port.
pub const XDP_ROUTES_MAP: &str = "XDP_ROUTES";
/// Name of the LPM trie of allowed source prefixes ([`XdpPrefixKey`] -> `u32` 1).
pub const XDP_ALLOW_MAP: &str = "XDP_ALLOW";
/// Name of the LPM trie of denied source prefixes ([`XdpPrefixKey`] -> `u32` 1).
pub const XDP_DENY_MAP: &str = "XDP_DENY";
/// Name of the LRU hash of SYN token buckets ([`XdpSynKey`] -> [`XdpSynBucket`]).
pub const XDP_SYN_MAP: &str = "XDP_SYN";
/// Name of the per-CPU array of drop counters, index [`xdp_drop_index`].
pub const XDP_DROPS_MAP: &str = "XDP_DROPS";

/// Route ids are below this; the drop counter array has [`XDP_REASONS`] slots per id.
pub const XDP_MAX_ROUTES: u32 = 1024;
/// Capacity of each prefix trie (allow, deny), over all routes.
pub const XDP_MAX_PREFIXES: u32 = 16_384;
/// Sources whose SYN buckets are remembered at once (least recently used ones are forgotten:
/// a forgotten source starts again with a full bucket).
pub const XDP_SYN_SOURCES: u32 = 65_536;

/// Drop reason: the source is denied or not allowed.
pub const XDP_REASON_ACL: u32 = 0;
/// Drop reason: the source's SYN bucket was empty.
pub const XDP_REASON_SYN_RATE: u32 = 1;
/// Number of drop reasons.
pub const XDP_REASONS: u32 = 2;

/// [`XdpRoute::flags`]: the route has an `allow` list; a source outside it is dropped.
pub const XDP_ROUTE_HAS_ALLOW: u32 = 1;
/// [`XdpRoute::flags`]: the route has a `deny` list.
pub const XDP_ROUTE_HAS_DENY: u32 = 2;

/// Index of a (route id, reason) counter in `XDP_DROPS`.
pub const fn xdp_drop_index(route: u32, reason: u32) -> u32 {
    route * XDP_REASONS + reason
}

/// Nanoseconds' worth of tokens one SYN costs: a bucket holds `rate * SYN_COST_NS * 2` at most
/// and gains `rate` per nanosecond, which keeps the arithmetic in integers.
pub const XDP_SYN_COST: u64 = 1_000_000_000;

/// A listen address and port. The wildcard addresses are `::` (IPv6) and `::ffff:0.0.0.0`
/// (IPv4); a `[::]` listener that also takes IPv4 has both.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct XdpRouteKey {
    /// Destination address (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// Always 0 (explicit padding, so the key has no undefined bytes).
    pub pad: u16,
}

/// What the XDP front does for packets to one route.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq, Eq)]
pub struct XdpRoute {
    /// The route's id: the first four bytes (big endian) of its prefix keys and of its SYN
    /// bucket keys, and its slot in the drop counters.
    pub id: u32,
    /// `XDP_ROUTE_*` bits.
    pub flags: u32,
    /// New connections per second per source (IPv4 /32, IPv6 /64); 0: no limit.
    pub syn_rate: u32,
    /// Always 0.
    pub pad: u32,
}

/// The data of an LPM trie key: the route id (big endian, bytes 0..4, matched first), the
/// family (byte 4: 4 or 6; bytes 5..8 zero) and the address (bytes 8..24: an IPv4 address in
/// 8..12). The trie key's prefix length is [`XDP_PREFIX_BASE`] plus the prefix's own, so an
/// IPv6 `::/0` never matches an IPv4 source.
pub type XdpPrefixKey = [u8; 24];

/// Bits of an [`XdpPrefixKey`] before the address: route id, family, padding.
pub const XDP_PREFIX_BASE: u32 = 64;

/// A SYN bucket's key: route id and source (IPv6 masked to its /64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq, Eq)]
pub struct XdpSynKey {
    /// The route's [`XdpRoute::id`].
    pub route: u32,
    /// The source address (IPv4-mapped, or the IPv6 /64 with the low 64 bits zero).
    pub addr: [u8; 16],
}

/// A token bucket: `tokens` in units where one SYN costs [`XDP_SYN_COST`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq, Eq)]
pub struct XdpSynBucket {
    /// Tokens left at `last_ns`.
    pub tokens: u64,
    /// `bpf_ktime_get_ns()` of the last refill.
    pub last_ns: u64,
}

/// The token bucket's step, shared by the XDP program and the daemon's accept-time check so
/// both enforce the same limit: refills `bucket` at `rate` SYNs per second up to a burst of
/// `2 * rate`, then takes one SYN if there is one. Returns whether the SYN may pass.
pub fn syn_bucket_take(bucket: &mut XdpSynBucket, rate: u32, now_ns: u64) -> bool {
    let rate = u64::from(rate);
    let cap = rate * 2 * XDP_SYN_COST;
    // Two seconds refill any bucket: clamping keeps `elapsed * rate` far from overflowing.
    let elapsed = now_ns.saturating_sub(bucket.last_ns).min(2 * XDP_SYN_COST);
    let tokens = bucket.tokens + elapsed * rate;
    bucket.tokens = if tokens > cap { cap } else { tokens };
    bucket.last_ns = now_ns;
    if bucket.tokens >= XDP_SYN_COST {
        bucket.tokens -= XDP_SYN_COST;
        true
    } else {
        false
    }
}

/// A new source's bucket: full, minus the SYN that created it.
pub fn syn_bucket_new(rate: u32, now_ns: u64) -> XdpSynBucket {
    XdpSynBucket {
        tokens: (u64::from(rate) * 2 * XDP_SYN_COST).saturating_sub(XDP_SYN_COST),
        last_ns: now_ns,
    }
}
