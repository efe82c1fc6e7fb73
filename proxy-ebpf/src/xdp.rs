//! spliced's XDP front: source ACLs and a per-source SYN token bucket for every route, enforced
//! in the driver before the kernel's TCP stack sees a packet (no SYN-ACK, no listen-queue slot).
//!
//! Parses Ethernet with up to two VLAN tags (802.1Q, 802.1ad), IPv4 with options and IPv6 with
//! the extension headers it knows (hop-by-hop, routing with no segments left, destination
//! options, fragment, AH). Whatever it cannot parse safely passes untouched: unknown extension
//! headers, non-first fragments (they carry no TCP header; the kernel reassembles them and the
//! daemon's accept-time check still applies), non-TCP. Needs Linux 4.18 for generic mode on any
//! interface (`bpf_fib_lookup`); native mode needs driver support (veth: 4.19).
#![no_std]
#![no_main]

mod object;

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_FWD_DISABLED,
        BPF_FIB_LKUP_RET_NOT_FWDED,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns},
    macros::{map, xdp},
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use proxy_common::{
    syn_bucket_new, syn_bucket_take, xdp_drop_index, XdpPrefixKey, XdpRoute, XdpRouteKey,
    XdpSynBucket, XdpSynKey, XDP_MAX_PREFIXES, XDP_MAX_ROUTES, XDP_PREFIX_BASE, XDP_REASONS,
    XDP_REASON_ACL, XDP_REASON_SYN_RATE, XDP_ROUTE_HAS_ALLOW, XDP_ROUTE_HAS_DENY, XDP_SYN_SOURCES,
};

/// Listen address and port -> the route's rules (filled by the daemon for every route).
#[map]
static XDP_ROUTES: HashMap<XdpRouteKey, XdpRoute> =
    HashMap::with_max_entries(2 * XDP_MAX_ROUTES, 0);

/// (route id, allowed source prefix) -> 1.
#[map]
static XDP_ALLOW: LpmTrie<XdpPrefixKey, u32> = LpmTrie::with_max_entries(XDP_MAX_PREFIXES, 0);

/// (route id, denied source prefix) -> 1.
#[map]
static XDP_DENY: LpmTrie<XdpPrefixKey, u32> = LpmTrie::with_max_entries(XDP_MAX_PREFIXES, 0);

/// (route id, source /32 or /64) -> SYN token bucket. LRU: a flood of new sources evicts the
/// oldest buckets instead of failing inserts.
#[map]
static XDP_SYN: LruHashMap<XdpSynKey, XdpSynBucket> =
    LruHashMap::with_max_entries(XDP_SYN_SOURCES, 0);

/// Drops per (route id, reason), per CPU: no atomic adds on the fast path.
#[map]
static XDP_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(XDP_MAX_ROUTES * XDP_REASONS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// IPv6 extension headers followed before giving up (passing the packet).
const MAX_EXT_HEADERS: usize = 6;

/// What the parser found in a TCP packet.
struct Tcp {
    family: u8,
    /// Source and destination, IPv4-mapped for IPv4.
    src: [u8; 16],
    dst: [u8; 16],
    dport: u16,
    sport: u16,
    flags: u8,
}

/// The program for kernels without XDP multi-buffer (before 5.18), and the fallback.
#[xdp]
pub fn spliced_xdp(ctx: XdpContext) -> u32 {
    run(&ctx)
}

/// The same program marked `frags` (section `xdp.frags`, `BPF_F_XDP_HAS_FRAGS`, Linux 5.18):
/// it declares it can take a frame spread over several buffers. It reads only the headers,
/// which every driver puts in the first buffer (`data..data_end`), so nothing else changes.
/// The kernel then lets it run on multi-buffer frames: native mode with jumbo MTUs, and in
/// generic mode a non-linear skb is copied into page fragments instead of being linearized.
/// See docs/xdp.md ("Cost") for what it does not change (veth turns off its peer's GSO).
#[xdp(frags)]
pub fn spliced_xdp_frags(ctx: XdpContext) -> u32 {
    run(&ctx)
}

#[inline(always)]
fn run(ctx: &XdpContext) -> u32 {
    match parse(ctx) {
        Some(tcp) => decide(ctx, &tcp),
        None => xdp_action::XDP_PASS,
    }
}

/// `len` bytes at `off` from the start of the frame, if the frame has them.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, off: usize) -> Option<[u8; N]> {
    let start = ctx.data();
    if start + off + N > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked against data_end just above (the verifier checks it again).
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const [u8; N]) })
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Option<Tcp> {
    let mut proto = be16(bytes::<2>(ctx, 12)?);
    let mut off = ETH_HLEN;
    // Up to two tags (QinQ): outer 802.1ad or 802.1Q, inner 802.1Q.
    for _ in 0..2 {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        proto = be16(bytes::<2>(ctx, off + 2)?);
        off += 4;
    }
    match proto {
        ETH_P_IP => parse_ipv4(ctx, off),
        ETH_P_IPV6 => parse_ipv6(ctx, off),
        _ => None,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, off: usize) -> Option<Tcp> {
    let h = bytes::<20>(ctx, off)?;
    if h[0] >> 4 != 4 || h[9] != IPPROTO_TCP {
        return None;
    }
    let ihl = usize::from(h[0] & 0x0f) * 4;
    // A non-first fragment has no TCP header; ihl < 20 is malformed.
    if be16([h[6], h[7]]) & 0x1fff != 0 || ihl < 20 {
        return None;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[10] = 0xff;
    src[11] = 0xff;
    dst[10] = 0xff;
    dst[11] = 0xff;
    src[12..].copy_from_slice(&h[12..16]);
    dst[12..].copy_from_slice(&h[16..20]);
    tcp(ctx, off + ihl, AF_INET, src, dst)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, off: usize) -> Option<Tcp> {
    let h = bytes::<40>(ctx, off)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let mut next = h[6];
    let mut off = off + 40;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            6 => {
                let mut src = [0u8; 16];
                let mut dst = [0u8; 16];
                src.copy_from_slice(&h[8..24]);
                dst.copy_from_slice(&h[24..40]);
                return tcp(ctx, off, AF_INET6, src, dst);
            }
            // Hop-by-hop, destination options: length in 8-byte units beyond the first 8.
            0 | 60 => {
                let e = bytes::<2>(ctx, off)?;
                next = e[0];
                off += (usize::from(e[1]) + 1) * 8;
            }
            // Routing: with segments left, this host is not the final destination.
            43 => {
                let e = bytes::<4>(ctx, off)?;
                if e[3] != 0 {
                    return None;
                }
                next = e[0];
                off += (usize::from(e[1]) + 1) * 8;
            }
            // Fragment: only the first fragment carries the TCP header.
            44 => {
                let e = bytes::<4>(ctx, off)?;
                if be16([e[2], e[3]]) >> 3 != 0 {
                    return None;
                }
                next = e[0];
                off += 8;
            }
            // Authentication header: length in 4-byte units minus 2.
            51 => {
                let e = bytes::<2>(ctx, off)?;
                next = e[0];
                off += (usize::from(e[1]) + 2) * 4;
            }
            _ => return None,
        }
    }
    None
}

#[inline(always)]
fn tcp(ctx: &XdpContext, off: usize, family: u8, src: [u8; 16], dst: [u8; 16]) -> Option<Tcp> {
    let t = bytes::<14>(ctx, off)?;
    Some(Tcp {
        family,
        src,
        dst,
        sport: be16([t[0], t[1]]),
        dport: be16([t[2], t[3]]),
        flags: t[13],
    })
}

#[inline(always)]
fn decide(ctx: &XdpContext, tcp: &Tcp) -> u32 {
    let Some(route) = find_route(ctx, tcp) else {
        return xdp_action::XDP_PASS;
    };
    if route.flags & (XDP_ROUTE_HAS_ALLOW | XDP_ROUTE_HAS_DENY) != 0 {
        let mut data: XdpPrefixKey = [0; 24];
        data[..4].copy_from_slice(&route.id.to_be_bytes());
        if tcp.family == AF_INET {
            data[4] = 4;
            data[8..12].copy_from_slice(&tcp.src[12..]);
        } else {
            data[4] = 6;
            data[8..].copy_from_slice(&tcp.src);
        }
        let key = Key::new(XDP_PREFIX_BASE + 128, data);
        let denied = route.flags & XDP_ROUTE_HAS_DENY != 0 && XDP_DENY.get(&key).is_some();
        let allowed = route.flags & XDP_ROUTE_HAS_ALLOW == 0 || XDP_ALLOW.get(&key).is_some();
        if denied || !allowed {
            return drop(route.id, XDP_REASON_ACL);
        }
    }
    if route.syn_rate != 0 && tcp.flags & (TCP_SYN | TCP_ACK) == TCP_SYN && !syn_pass(tcp, &route) {
        return drop(route.id, XDP_REASON_SYN_RATE);
    }
    xdp_action::XDP_PASS
}

/// The route of an exact listen address, else of the family's wildcard address when the
/// destination is local (a wildcard listener takes only what the host itself receives; a
/// packet the host forwards, to a container say, is none of its business).
#[inline(always)]
fn find_route(ctx: &XdpContext, tcp: &Tcp) -> Option<XdpRoute> {
    let mut key = XdpRouteKey {
        addr: tcp.dst,
        port: tcp.dport,
        pad: 0,
    };
    // SAFETY: a map value, copied out at once.
    if let Some(route) = unsafe { XDP_ROUTES.get(key) } {
        return Some(*route);
    }
    key.addr = [0; 16];
    if tcp.family == AF_INET {
        key.addr[10] = 0xff;
        key.addr[11] = 0xff;
    }
    // SAFETY: as above.
    let route = unsafe { XDP_ROUTES.get(key) }.copied()?;
    is_local(ctx, tcp).then_some(route)
}

/// Whether the host itself would receive a packet to `tcp.dst`: the FIB says "not forwarded"
/// (a local route), or forwarding is off (then every packet the stack takes is local).
#[inline(always)]
fn is_local(ctx: &XdpContext, tcp: &Tcp) -> bool {
    // SAFETY: plain old data; all-zero is a valid value.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = tcp.family;
    p.l4_protocol = IPPROTO_TCP;
    p.sport = tcp.sport.to_be();
    p.dport = tcp.dport.to_be();
    p.ifindex = ctx.ingress_ifindex() as u32;
    if tcp.family == AF_INET {
        let mut src = [0u8; 4];
        let mut dst = [0u8; 4];
        src.copy_from_slice(&tcp.src[12..]);
        dst.copy_from_slice(&tcp.dst[12..]);
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    } else {
        p.__bindgen_anon_3.ipv6_src = words(&tcp.src);
        p.__bindgen_anon_4.ipv6_dst = words(&tcp.dst);
    }
    // SAFETY: `p` lives on this stack frame for the call; the size is its own.
    let ret = unsafe { bpf_fib_lookup(ctx.ctx.cast(), &mut p, size_of::<FibParams>() as i32, 0) };
    // A lookup error (< 0): treat as local, so the route's rules apply (fail closed).
    ret < 0
        || ret == BPF_FIB_LKUP_RET_NOT_FWDED as i64
        || ret == BPF_FIB_LKUP_RET_FWD_DISABLED as i64
}

/// Network-order words of an IPv6 address, as `struct bpf_fib_lookup` holds them.
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Takes a token from the source's bucket (IPv4 /32, IPv6 /64), creating a full one for a new
/// source. Two CPUs may update one bucket at once and lose a step: the limit is approximate
/// by at most a packet per CPU, not worth a spin lock on the fast path.
#[inline(always)]
fn syn_pass(tcp: &Tcp, route: &XdpRoute) -> bool {
    let mut key = XdpSynKey {
        route: route.id,
        addr: tcp.src,
    };
    if tcp.family != AF_INET {
        key.addr[8..].fill(0);
    }
    // SAFETY: ktime has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match XDP_SYN.get_ptr_mut(key) {
        // SAFETY: a pointer into a preallocated LRU value, valid during this program run.
        Some(bucket) => syn_bucket_take(unsafe { &mut *bucket }, route.syn_rate, now),
        None => {
            let _ = XDP_SYN.insert(key, syn_bucket_new(route.syn_rate, now), 0);
            true
        }
    }
}

#[inline(always)]
fn drop(route: u32, reason: u32) -> u32 {
    if let Some(n) = XDP_DROPS.get_ptr_mut(xdp_drop_index(route, reason)) {
        // SAFETY: this CPU's slot; XDP runs with preemption off, so nothing else writes it now.
        unsafe { *n += 1 };
    }
    xdp_action::XDP_DROP
}
