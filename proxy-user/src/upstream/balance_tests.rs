use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;

fn server(name: &str, weight: u32) -> Candidate {
    Candidate {
        key: key_of(name),
        weight,
        active: 0,
        backup: false,
        up: true,
    }
}

fn client(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0xc633_6400 + i)) // 198.51.100.0 + i
}

const ANY: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// How many of `picks` first picks each server gets.
fn count(balance: Balance, servers: &[Candidate], picks: u32) -> Vec<u32> {
    let mut rr = RoundRobin::default();
    let mut counts = vec![0; servers.len()];
    for i in 0..picks {
        counts[order(balance, servers, &mut rr, client(i))[0]] += 1;
    }
    counts
}

#[test]
fn every_server_once_in_the_order() {
    let mut servers = vec![server("a", 1), server("b", 2), server("c", 1)];
    servers[1].up = false;
    servers[2].backup = true;
    for balance in Balance::ALL {
        let mut o = order(balance, &servers, &mut RoundRobin::default(), ANY);
        o.sort_unstable();
        assert_eq!(o, [0, 1, 2], "{balance}");
    }
    assert!(order(Balance::RoundRobin, &[], &mut RoundRobin::default(), ANY).is_empty());
}

#[test]
fn round_robin_weights_are_exact_and_interleaved() {
    let servers = [server("a", 3), server("b", 1)];
    assert_eq!(count(Balance::RoundRobin, &servers, 4000), [3000, 1000]);
    // Smooth: b every fourth pick, between a's.
    let mut rr = RoundRobin::default();
    let seq: String = (0..16)
        .map(|_| ["a", "b"][order(Balance::RoundRobin, &servers, &mut rr, ANY)[0]])
        .collect();
    assert_eq!(seq, "aaba".repeat(4));
    let three = [server("a", 1), server("b", 1), server("c", 1)];
    assert_eq!(count(Balance::RoundRobin, &three, 3000), [1000, 1000, 1000]);
}

#[test]
fn round_robin_state_survives_a_server_leaving_and_coming_back() {
    let mut servers = [server("a", 1), server("b", 1)];
    let mut rr = RoundRobin::default();
    let mut seen = [0; 2];
    for i in 0..100 {
        servers[1].up = !(40..60).contains(&i);
        let first = order(Balance::RoundRobin, &servers, &mut rr, ANY)[0];
        assert!(servers[first].up, "pick {i} went to a down server");
        seen[first] += 1;
    }
    assert_eq!(seen, [60, 40]);
}

#[test]
fn backup_only_while_no_primary_is_up() {
    let mut servers = [server("a", 1), server("b", 1), server("backup", 5)];
    servers[2].backup = true;
    for balance in Balance::ALL {
        let counts = count(balance, &servers, 1000);
        assert_eq!(
            counts[2], 0,
            "{balance}: backup used while primaries are up"
        );
        // The backup still comes before the down servers as the fallback of a failed dial.
        let o = order(balance, &servers, &mut RoundRobin::default(), ANY);
        assert_eq!(o[2], 2, "{balance}");
    }
    servers[0].up = false;
    assert_eq!(count(Balance::RoundRobin, &servers, 100), [0, 100, 0]);
    servers[1].up = false;
    for balance in Balance::ALL {
        assert_eq!(count(balance, &servers, 100), [0, 0, 100], "{balance}");
        let o = order(balance, &servers, &mut RoundRobin::default(), ANY);
        assert_eq!(o[0], 2);
        assert_eq!(o.len(), 3, "down primaries are the last resort");
    }
    servers[2].up = false;
    // Nothing up: down primaries first, then the down backup.
    let o = order(
        Balance::RoundRobin,
        &servers,
        &mut RoundRobin::default(),
        ANY,
    );
    assert_eq!(o[2], 2);
}

#[test]
fn least_conn_takes_the_least_loaded_for_its_weight() {
    let mut servers = [server("a", 1), server("b", 1), server("c", 2)];
    servers[0].active = 5;
    servers[1].active = 2;
    servers[2].active = 5; // (5+1)/2 = 3 > (2+1)/1 = 3? equal: tie
    let o = order(
        Balance::LeastConn,
        &servers,
        &mut RoundRobin::default(),
        ANY,
    );
    assert_eq!(*o.last().unwrap(), 0, "{o:?}");
    servers[2].active = 4; // (4+1)/2 = 2.5 < 3
    let o = order(
        Balance::LeastConn,
        &servers,
        &mut RoundRobin::default(),
        ANY,
    );
    assert_eq!(o, [2, 1, 0]);
    // An idle set is used in turn, not always from its first server.
    let idle = [server("a", 1), server("b", 1), server("c", 1)];
    assert_eq!(count(Balance::LeastConn, &idle, 300), [100, 100, 100]);
}

#[test]
fn least_conn_fills_up_evenly() {
    // Long-lived connections: each pick holds one more connection on its server.
    let mut servers = [server("a", 1), server("b", 1), server("c", 1)];
    servers[0].active = 10;
    let mut rr = RoundRobin::default();
    for _ in 0..20 {
        let first = order(Balance::LeastConn, &servers, &mut rr, ANY)[0];
        servers[first].active += 1;
    }
    let active: Vec<u64> = servers.iter().map(|s| s.active).collect();
    assert_eq!(active, [10, 10, 10]);
}

#[test]
fn source_is_sticky() {
    let servers: Vec<Candidate> = (0..4).map(|i| server(&format!("s{i}"), 1)).collect();
    let mut rr = RoundRobin::default();
    for i in 0..200 {
        let a = order(Balance::Source, &servers, &mut rr, client(i));
        let b = order(Balance::Source, &servers, &mut rr, client(i));
        assert_eq!(a, b);
    }
    // IPv4-mapped IPv6 is the same client as the IPv4 address.
    let v4 = client(7);
    let IpAddr::V4(a) = v4 else { unreachable!() };
    let mapped = IpAddr::V6(a.to_ipv6_mapped());
    assert_eq!(
        order(Balance::Source, &servers, &mut rr, v4),
        order(Balance::Source, &servers, &mut rr, mapped)
    );
    // Spread: each of 4 servers gets 25% ± 3% of 20,000 clients.
    let counts = count(Balance::Source, &servers, 20_000);
    for &c in &counts {
        assert!((4400..=5600).contains(&c), "{counts:?}");
    }
}

#[test]
fn source_removing_one_of_n_moves_about_one_nth() {
    let n = 5;
    let all: Vec<Candidate> = (0..n)
        .map(|i| server(&format!("10.0.0.{i}:80"), 1))
        .collect();
    let fewer: Vec<Candidate> = all[..n - 1].to_vec();
    let mut rr = RoundRobin::default();
    let clients: u32 = 20_000;
    let mut moved = 0;
    for i in 0..clients {
        let ip = IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i)));
        let before = order(Balance::Source, &all, &mut rr, ip)[0];
        let after = order(Balance::Source, &fewer, &mut rr, ip)[0];
        if before != after {
            assert_eq!(before, n - 1, "a client of a remaining server moved");
            moved += 1;
        }
    }
    let share = f64::from(moved) / f64::from(clients);
    assert!(
        (0.17..=0.23).contains(&share),
        "moved {share}, expected about 1/{n}"
    );
    // Marking the server down instead of removing it moves the same clients.
    let mut down = all.clone();
    down[n - 1].up = false;
    for i in 0..1000 {
        let ip = client(i);
        assert_eq!(
            order(Balance::Source, &down, &mut rr, ip)[0],
            order(Balance::Source, &fewer, &mut rr, ip)[0]
        );
    }
}

#[test]
fn source_honours_weights() {
    let servers = [server("a", 3), server("b", 1)];
    let counts = count(Balance::Source, &servers, 20_000);
    let share = f64::from(counts[0]) / 20_000.0;
    assert!((0.72..=0.78).contains(&share), "{counts:?}");
}

#[test]
fn keys_are_stable() {
    // Fixed values: a change here moves every `source` client after an upgrade.
    assert_eq!(key_of(""), mix64(0xcbf2_9ce4_8422_2325));
    assert_ne!(key_of("10.0.0.1:80"), key_of("10.0.0.2:80"));
    assert_eq!(key_of("10.0.0.1:80"), key_of("10.0.0.1:80"));
}
