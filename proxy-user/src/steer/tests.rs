//! The program on the running kernel: which socket of a group a connection lands on, for given
//! loads. Needs root (or CAP_BPF and CAP_NET_ADMIN); without, it says so and returns, unless
//! `SPLICED_REQUIRE_EBPF=1`.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use socket2::{Domain, Socket, Type};

use super::*;

fn steer() -> Option<&'static Steer> {
    match get(crate::STEER_OBJECT) {
        Ok(s) => Some(s),
        Err(e) if std::env::var("SPLICED_REQUIRE_EBPF").is_ok_and(|v| v == "1") => {
            panic!("accept steering unavailable: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// Two listening sockets in one `SO_REUSEPORT` group on a free loopback port.
fn group_of_two() -> (Vec<TcpListener>, u16) {
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
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
    (sockets, addr.port())
}

/// How many of `n` connections each socket's accept queue got.
fn spread(sockets: &[TcpListener], port: u16, n: usize) -> Vec<usize> {
    let clients: Vec<TcpStream> = (0..n)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
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
    let Some(steer) = steer() else { return };
    let (sockets, port) = group_of_two();
    let mut group = steer.reserve(port).unwrap();
    group.fill(&sockets).unwrap();
    assert!(matches!(steer.reserve(port), Err(SteerError::PortTaken(p)) if p == port));
    steer.set_lanes(2);
    // Lane 0 far ahead: whatever core takes the SYN, lane 1 gets it.
    let busy: Vec<OnLane> = (0..STEER_SLACK as usize + 3)
        .map(|_| steer.enter(0))
        .collect();
    assert_eq!(spread(&sockets, port, 12), vec![0, 12]);
    drop(busy);
    let busy: Vec<OnLane> = (0..STEER_SLACK as usize + 3)
        .map(|_| steer.enter(1))
        .collect();
    assert_eq!(spread(&sockets, port, 12), vec![12, 0]);
    drop(busy);
    assert!(steer.picks()[0] >= 12 && steer.picks()[1] >= 12);
    // No lanes yet (the daemon sets them once they run): the kernel's hash picks, and no
    // connection is lost to the program.
    steer.set_lanes(0);
    let got = spread(&sockets, port, 16);
    assert_eq!(got.iter().sum::<usize>(), 16, "{got:?}");
    drop(group);
    assert!(
        steer.reserve(port).is_ok(),
        "a dropped group frees its port"
    );
}
