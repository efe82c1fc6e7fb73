//! spliced's accept steering: an `sk_reuseport` program on each route's group of listening
//! sockets, one socket per lane (the daemon's per-core threads, each with its own event loop).
//!
//! A new connection goes to the lane of the core whose softirq took its SYN, so the thread that
//! accepts it and runs it to the end is the one the kernel's wake-ups already land on, unless
//! that lane carries more than `STEER_SLACK` connections more than the least loaded lane: then
//! to the least loaded one (a single-queue NIC hands every SYN to one core). The loads are the
//! daemon's own counts, written through a shared mapping of `STEER_LOAD`. Whatever fails here
//! (a port not in `STEER_GROUPS`, an empty slot, none of the port's groups the SYN's) leaves
//! the choice to the kernel's hash, which still picks a socket of the group: no connection is
//! lost to a miss. Needs Linux 5.5 (`BPF_F_MMAPABLE`); direct packet access in `sk_reuseport` is
//! older (4.19).
#![no_std]
#![no_main]

mod object;

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_MMAPABLE},
    helpers::bpf_get_smp_processor_id,
    macros::{map, sk_reuseport},
    maps::{Array, HashMap, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
};
use proxy_common::{
    STEER_LANES_SLOT, STEER_LEAST_SLOT, STEER_LOAD_SLOTS, STEER_MAX_GROUPS, STEER_MAX_LANES,
    STEER_PORT_GROUPS, STEER_SLACK,
};

/// `group * STEER_MAX_LANES + lane` -> that lane's socket of the group.
#[map]
static STEER_SOCKETS: ReusePortSockArray =
    ReusePortSockArray::with_max_entries(STEER_MAX_GROUPS * STEER_MAX_LANES, 0);

/// A port as the TCP header carries it -> the indices of the groups listening on it, plus one.
#[map]
static STEER_GROUPS: HashMap<u32, [u32; STEER_PORT_GROUPS]> =
    HashMap::with_max_entries(STEER_MAX_GROUPS, 0);

/// Lane -> connections it carries now, then how many lanes and the least loaded one (the daemon
/// writes all of it). 64-bit values: an array map's values sit 8 bytes apart, in the daemon's
/// mapping too.
#[map]
static STEER_LOAD: Array<u64> = Array::with_max_entries(STEER_LOAD_SLOTS, BPF_F_MMAPABLE);

/// Lane -> connections handed to it here, counted per CPU (the daemon's status and metrics add
/// the CPUs' counts): SYNs steered on two cores at once must not lose a count, and the BPF
/// target has no atomic add to give a shared slot.
#[map]
static STEER_PICKS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STEER_MAX_LANES, 0);

#[sk_reuseport]
pub fn spliced_steer(ctx: SkReuseportContext) -> u32 {
    let _ = steer(&ctx);
    SK_PASS
}

fn steer(ctx: &SkReuseportContext) -> Option<()> {
    // For TCP the data starts at the TCP header; bytes 2-3 are the destination port.
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 4 > end {
        return None;
    }
    // SAFETY: the two bytes are inside the packet, checked above.
    let port = unsafe { core::ptr::read_unaligned((data + 2) as *const u16) };
    // SAFETY: the value is plain u32s, copied once.
    let groups = *unsafe { STEER_GROUPS.get(u32::from(port)) }?;
    let lanes = load(STEER_LANES_SLOT)?.min(u64::from(STEER_MAX_LANES)) as u32;
    if lanes == 0 {
        return None;
    }
    // SAFETY: a helper without arguments.
    let own = unsafe { bpf_get_smp_processor_id() } % lanes;
    let lane = pick(own, lanes)?;
    // Listeners on other addresses of the port have groups of their own. The kernel refuses a
    // socket of a group other than the one this SYN was matched to (EBADFD, EAFNOSUPPORT) and
    // changes nothing, so each of the port's groups is tried until one is this SYN's.
    for group in groups {
        let Some(index) = group.checked_sub(1) else {
            continue;
        };
        let key = index.checked_mul(STEER_MAX_LANES)?.checked_add(lane)?;
        if STEER_SOCKETS.select_reuseport(ctx, key).is_ok() {
            count(lane);
            return Some(());
        }
    }
    None
}

fn count(lane: u32) {
    if let Some(picks) = STEER_PICKS.get_ptr_mut(lane) {
        // SAFETY: a valid slot of this CPU's copy; the program runs with migration disabled,
        // so nothing else writes it meanwhile.
        unsafe { *picks += 1 };
    }
}

/// `own` unless it carries more than `STEER_SLACK` connections more than the least loaded lane,
/// which the daemon keeps in `STEER_LEAST_SLOT` (no loop here: a loop over the lanes made
/// Linux 6.1's verifier give up, each iteration a state of its own).
fn pick(own: u32, lanes: u32) -> Option<u32> {
    let least = load(STEER_LEAST_SLOT)? as u32;
    if least >= lanes {
        return Some(own);
    }
    let (mine, fewest) = (load(own)?, load(least)?);
    Some(if mine <= fewest.saturating_add(u64::from(STEER_SLACK)) {
        own
    } else {
        least
    })
}

fn load(lane: u32) -> Option<u64> {
    let slot = STEER_LOAD.get_ptr(lane)?;
    // SAFETY: a valid slot; the daemon writes it concurrently, so read it once, volatile.
    Some(unsafe { core::ptr::read_volatile(slot) })
}
