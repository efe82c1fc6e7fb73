//! The pure balancing decisions: in which order a new connection tries the servers of a set.
//! No I/O and no clock; the set feeds in each server's key, weight, live connections, backup flag
//! and health.
use std::{collections::HashMap, net::IpAddr};

use super::Balance;

/// One server as the balancer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// A stable identity ([`key_of`] the server's name): the consistent hash and the round-robin
    /// state are keyed by it, so they survive reloads and re-resolution.
    pub key: u64,
    /// 1 or more.
    pub weight: u32,
    /// Live connections now (leastconn).
    pub active: u64,
    pub backup: bool,
    pub up: bool,
}

/// Smooth weighted round robin (nginx's algorithm): each pick adds every server's weight to its
/// current value, takes the largest and subtracts the total from it. Over any window of
/// `sum(weights)` picks each server gets exactly its weight, interleaved (3:1 gives A A B A, not
/// A A A B). Keyed by server so that a server going down and up does not reset the others.
#[derive(Debug, Default)]
pub struct RoundRobin {
    current: HashMap<u64, i64>,
    /// Turns taken: rotates leastconn's ties.
    turn: u64,
}

/// Above this many remembered servers the state starts over (host names whose addresses keep
/// changing would otherwise grow it without bound).
const MAX_REMEMBERED: usize = 4096;

/// The order in which a new connection tries `servers`: up primaries by the balance, then up
/// backups (reached only when every up primary failed, or none is up), then the servers marked
/// down, primaries first, as a last resort (a server a dial found down may be back already).
/// Each index appears once.
pub fn order(
    balance: Balance,
    servers: &[Candidate],
    rr: &mut RoundRobin,
    client: IpAddr,
) -> Vec<usize> {
    let tiers = [(true, false), (true, true), (false, false), (false, true)];
    let mut out = Vec::with_capacity(servers.len());
    let mut first = true;
    for (up, backup) in tiers {
        let tier: Vec<usize> = (0..servers.len())
            .filter(|&i| servers[i].up == up && servers[i].backup == backup)
            .collect();
        if tier.is_empty() {
            continue;
        }
        // Only the tier that takes the connection advances the round robin; the fallbacks are
        // ordered without touching it.
        let mut scratch = RoundRobin::default();
        let state = if first { &mut *rr } else { &mut scratch };
        first = false;
        let picked: Vec<Candidate> = tier.iter().map(|&i| servers[i]).collect();
        out.extend(
            tier_order(balance, &picked, state, client)
                .into_iter()
                .map(|j| tier[j]),
        );
    }
    out
}

/// The order within one tier.
fn tier_order(
    balance: Balance,
    servers: &[Candidate],
    rr: &mut RoundRobin,
    client: IpAddr,
) -> Vec<usize> {
    rr.turn = rr.turn.wrapping_add(1);
    match balance {
        Balance::RoundRobin => round_robin(servers, rr),
        Balance::LeastConn => least_conn(servers, rr.turn),
        Balance::Source => rendezvous(servers, client),
    }
}

/// The smooth weighted round robin pick first, then the others by their current value (the
/// order the next picks would take).
fn round_robin(servers: &[Candidate], rr: &mut RoundRobin) -> Vec<usize> {
    if rr.current.len() > MAX_REMEMBERED {
        rr.current.clear();
    }
    let total: i64 = servers.iter().map(|s| i64::from(s.weight.max(1))).sum();
    let mut values: Vec<i64> = servers
        .iter()
        .map(|s| {
            let v = rr.current.entry(s.key).or_insert(0);
            *v += i64::from(s.weight.max(1));
            *v
        })
        .collect();
    let mut idx: Vec<usize> = (0..servers.len()).collect();
    // Largest value first; equal values by position, so the first pick is deterministic.
    idx.sort_by(|&a, &b| values[b].cmp(&values[a]).then(a.cmp(&b)));
    let first = idx[0];
    values[first] -= total;
    rr.current.insert(servers[first].key, values[first]);
    idx
}

/// Fewest live connections for the weight first: `(active + 1) / weight`, compared by cross
/// multiplication. Ties rotate with `turn`, so an idle set is used round robin, not always from
/// its first server.
fn least_conn(servers: &[Candidate], turn: u64) -> Vec<usize> {
    let n = servers.len() as u64;
    let mut idx: Vec<usize> = (0..servers.len()).collect();
    let load = |s: &Candidate| u128::from(s.active + 1);
    idx.sort_by(|&a, &b| {
        let (x, y) = (&servers[a], &servers[b]);
        let lhs = load(x) * u128::from(y.weight.max(1));
        let rhs = load(y) * u128::from(x.weight.max(1));
        let rot = |i: usize| (i as u64 + n - turn % n) % n;
        lhs.cmp(&rhs).then(rot(a).cmp(&rot(b)))
    });
    idx
}

/// Weighted rendezvous hashing (highest random weight): every (client, server) pair gets a score
/// `-weight / ln(u)` with `u` uniform in (0, 1) from a hash of both; the highest score wins and
/// the rest follow in score order. Removing a server moves only the clients whose highest score
/// it had (1/N of them for N equal servers); those clients' next choice is spread over the
/// others, and a down server's clients fail over the same way.
fn rendezvous(servers: &[Candidate], client: IpAddr) -> Vec<usize> {
    let c = client_hash(client);
    let scores: Vec<f64> = servers
        .iter()
        .map(|s| {
            let h = mix64(c ^ mix64(s.key));
            // 53 random bits into (0, 1), never 0 or 1.
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            -f64::from(s.weight.max(1)) / u.ln()
        })
        .collect();
    let mut idx: Vec<usize> = (0..servers.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx
}

/// The stable key of a server name: 64-bit FNV-1a, then [`mix64`]. Written here rather than
/// taken from std because std's hasher may change between releases, and a `source` client
/// should reach the same server after spliced is upgraded.
pub fn key_of(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// The client's address as a key; an IPv4-mapped IPv6 address is its IPv4 address (a dual-stack
/// listener sees IPv4 clients that way).
fn client_hash(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => mix64(u64::from(u32::from(v4))),
        IpAddr::V6(v6) => {
            let n = u128::from(v6);
            mix64((n >> 64) as u64 ^ mix64(n as u64))
        }
    }
}

/// splitmix64's finaliser: every input bit affects every output bit.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
#[path = "balance_tests.rs"]
mod tests;
