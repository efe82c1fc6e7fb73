//! The program on the running kernel: which socket of a group a connection lands on, for given
//! loads. Needs root (or CAP_BPF and CAP_NET_ADMIN); without, it says so and returns, unless
//! `SPLICED_REQUIRE_EBPF=1`.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use socket2::{Domain, Socket, Type};

use super::*;

/// The program and its loads are one per process: the tests take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn steer() -> Option<(&'static Steer, std::sync::MutexGuard<'static, ()>)> {
    let turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    match get(crate::STEER_OBJECT) {
        Ok(s) => Some((s, turn)),
        Err(e) if std::env::var("SPLICED_REQUIRE_EBPF").is_ok_and(|v| v == "1") => {
            panic!("accept steering unavailable: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// Two listening sockets in one `SO_REUSEPORT` group on `ip` and `port` (0: a free one).
fn group_of_two(ip: &str, port: u16) -> (Vec<TcpListener>, SocketAddr) {
    let probe = TcpListener::bind((ip, port)).unwrap();
    let addr: SocketAddr = probe.local_addr().unwrap();
    drop(probe);
    let sockets = (0..2)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&addr.into()).unwrap();
            s.listen(128).unwrap();
            s.set_nonblocking(true).unwrap();
            TcpListener::from(s)
        })
        .collect();
    (sockets, addr)
}

/// How many of `n` connections each socket's accept queue got.
fn spread(sockets: &[TcpListener], addr: SocketAddr, n: usize) -> Vec<usize> {
    let clients: Vec<TcpStream> = (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(50));
    let counts = sockets
        .iter()
        .map(|s| std::iter::from_fn(|| s.accept().ok()).count())
        .collect();
    drop(clients);
    counts
}

#[test]
fn the_least_loaded_lane_takes_what_its_busy_sibling_would_and_no_lanes_means_the_hash() {
    let Some((steer, _turn)) = steer() else {
        return;
    };
    let (sockets, addr) = group_of_two("127.0.0.1", 0);
    let port = addr.port();
    let mut group = steer.reserve(port).unwrap();
    group.fill(&sockets).unwrap();
    steer.set_lanes(2);
    let before = steer.picks();
    // Lane 0 far ahead: whatever core takes the SYN, lane 1 gets it.
    let busy: Vec<OnLane> = (0..STEER_SLACK as usize + 3)
        .map(|_| steer.enter(0))
        .collect();
    assert_eq!(spread(&sockets, addr, 12), vec![0, 12]);
    drop(busy);
    let busy: Vec<OnLane> = (0..STEER_SLACK as usize + 3)
        .map(|_| steer.enter(1))
        .collect();
    assert_eq!(spread(&sockets, addr, 12), vec![12, 0]);
    drop(busy);
    // Every steered connection counted once, whichever CPU's copy of the count it went to.
    let picked: Vec<u64> = steer
        .picks()
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    assert_eq!(picked, vec![12, 12]);
    // No lanes yet (the daemon sets them once they run): the kernel's hash picks, and no
    // connection is lost to the program.
    steer.set_lanes(0);
    let got = spread(&sockets, addr, 16);
    assert_eq!(got.iter().sum::<usize>(), 16, "{got:?}");
    drop(group);
    let again: Vec<Group> = (0..STEER_PORT_GROUPS)
        .map(|_| {
            steer
                .reserve(port)
                .expect("a dropped group frees its place")
        })
        .collect();
    drop(again);
}

/// Listeners on two addresses of one port (a group each) are both steered, each connection to
/// its own address's group; a port takes [`STEER_PORT_GROUPS`] groups, and one group leaving
/// leaves the other steered.
#[test]
fn groups_on_two_addresses_of_one_port_are_both_steered() {
    let Some((steer, _turn)) = steer() else {
        return;
    };
    let (first, a) = group_of_two("127.0.0.1", 0);
    let (second, b) = group_of_two("127.0.0.2", a.port());
    let mut groups = vec![
        steer.reserve(a.port()).unwrap(),
        steer.reserve(a.port()).unwrap(),
    ];
    groups[0].fill(&first).unwrap();
    groups[1].fill(&second).unwrap();
    steer.set_lanes(2);
    let busy: Vec<OnLane> = (0..STEER_SLACK as usize + 3)
        .map(|_| steer.enter(0))
        .collect();
    // Lane 0 far ahead: each address's connections go to its own group's lane-1 socket.
    assert_eq!(spread(&first, a, 8), vec![0, 8]);
    assert_eq!(spread(&second, b, 8), vec![0, 8]);
    let more: Vec<Group> = (2..STEER_PORT_GROUPS)
        .map(|_| steer.reserve(a.port()).unwrap())
        .collect();
    assert!(
        matches!(steer.reserve(a.port()), Err(SteerError::PortFull(p)) if p == a.port()),
        "a port takes {STEER_PORT_GROUPS} groups"
    );
    drop(more);
    // The first group gone (its sockets out of the maps), the second is still steered.
    groups.remove(0);
    assert_eq!(spread(&second, b, 8), vec![0, 8]);
    drop(busy);
    steer.set_lanes(0);
}
