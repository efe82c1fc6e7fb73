//! The set, the failover dial and the checks against real loopback sockets.
use std::{
    net::{SocketAddr, TcpListener as StdListener},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::io::AsyncReadExt;

use super::*;

/// A port nothing listens on (bound, then closed): connecting is refused.
fn refused() -> SocketAddr {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A listener whose accept queue is full: the kernel drops further SYNs
/// (`tcp_abort_on_overflow = 0`), so a connect gets no answer, like a black-holed address.
/// Returns the listener and the connection that fills the queue; keep both.
fn black_hole() -> (socket2::Socket, std::net::TcpStream) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    (s, filler)
}

fn spec(addrs: &[SocketAddr]) -> UpstreamSpec {
    UpstreamSpec {
        servers: addrs
            .iter()
            .map(|a| ServerSpec::new(a.to_string().parse().unwrap()))
            .collect(),
        balance: Balance::RoundRobin,
        health_check: None,
    }
}

fn set(spec: UpstreamSpec) -> Arc<Upstreams> {
    Arc::new(Upstreams::new(
        "web",
        spec,
        Arc::new(ServerTable::default()),
    ))
}

const CLIENT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);

fn opts(timeout: Duration) -> DialOptions<'static> {
    DialOptions {
        connect_timeout: timeout,
        interface: None,
    }
}

fn state_of(set: &Upstreams, addr: SocketAddr) -> State {
    let status = set.status();
    let s = status.iter().find(|s| s.name == addr.to_string()).unwrap();
    s.state
}

#[tokio::test]
async fn a_refused_server_is_skipped_and_marked_down() {
    let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (dead, up) = (refused(), live.local_addr().unwrap());
    let set = set(spec(&[dead, up]));
    for i in 0..6 {
        let d = dial(&set, CLIENT, &opts(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(d.addr, up);
        // Only the first dial tries the refused server; later ones skip it.
        assert_eq!(
            d.failed.len(),
            usize::from(i == 0),
            "dial {i}: {:?}",
            d.failed
        );
    }
    assert_eq!(state_of(&set, dead), State::Down);
    assert_eq!(state_of(&set, up), State::Up);
    let status = set.status();
    assert_eq!(status.iter().map(|s| s.total).sum::<u64>(), 6);
    assert_eq!(status.iter().map(|s| s.dial_failures).sum::<u64>(), 1);
}

#[tokio::test]
async fn a_black_hole_uses_only_its_share_of_the_connect_timeout() {
    let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (hole, _filler) = black_hole();
    let hole = hole.local_addr().unwrap().as_socket().unwrap();
    let up = live.local_addr().unwrap();
    let set = set(spec(&[hole, up]));
    let t = Instant::now();
    let d = dial(&set, CLIENT, &opts(Duration::from_secs(2)))
        .await
        .unwrap();
    assert_eq!(d.addr, up);
    assert!(
        t.elapsed() < Duration::from_millis(1800),
        "{:?}",
        t.elapsed()
    );
    assert!(
        matches!(d.failed[0].error, ConnectError::Timeout { .. }),
        "{:?}",
        d.failed
    );
    assert_eq!(state_of(&set, hole), State::Down);
    // Now skipped: no delay.
    let t = Instant::now();
    let d = dial(&set, CLIENT, &opts(Duration::from_secs(2)))
        .await
        .unwrap();
    assert!(d.failed.is_empty() && t.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn every_server_failing_names_each() {
    let (a, b) = (refused(), refused());
    let set = set(spec(&[a, b]));
    let e = dial(&set, CLIENT, &opts(Duration::from_secs(5)))
        .await
        .unwrap_err();
    let DialError::NoUpstream {
        attempts,
        timed_out,
    } = &e
    else {
        panic!("{e}")
    };
    assert_eq!((attempts.len(), *timed_out), (2, None));
    let text = e.to_string();
    assert!(
        text.starts_with("no upstream server could be reached: "),
        "{text}"
    );
    assert!(
        text.contains(&a.to_string()) && text.contains(&b.to_string()),
        "{text}"
    );
    // Both down now, and still tried (a last resort): a server back is used at once.
    let back = tokio::net::TcpListener::bind(b).await.unwrap();
    let d = dial(&set, CLIENT, &opts(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(d.addr, back.local_addr().unwrap());
    assert_eq!(
        state_of(&set, b),
        State::Up,
        "no checks: a dial brings it up"
    );
}

#[tokio::test]
async fn backup_takes_over_when_the_primary_fails() {
    let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backup = live.local_addr().unwrap();
    let mut s = spec(&[refused(), backup]);
    s.servers[1].backup = true;
    let set = set(s);
    for _ in 0..3 {
        let d = dial(&set, CLIENT, &opts(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(d.addr, backup);
    }
}

#[tokio::test]
async fn leastconn_spreads_long_connections() {
    let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut s = spec(&[a.local_addr().unwrap(), b.local_addr().unwrap()]);
    s.balance = Balance::LeastConn;
    let set = set(s);
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(
            dial(&set, CLIENT, &opts(Duration::from_secs(5)))
                .await
                .unwrap(),
        );
    }
    let on_a = held
        .iter()
        .filter(|d| d.addr == a.local_addr().unwrap())
        .count();
    assert_eq!(on_a, 5);
    // Connections to a end: the next ones go to a.
    held.retain(|d| d.addr != a.local_addr().unwrap());
    for _ in 0..5 {
        let d = dial(&set, CLIENT, &opts(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(d.addr, a.local_addr().unwrap());
        held.push(d);
    }
}

#[tokio::test]
async fn a_new_set_keeps_the_state_of_the_servers_it_shares() {
    let table = Arc::new(ServerTable::default());
    let dead = refused();
    let old = Upstreams::new("web", spec(&[dead]), table.clone());
    let _ = dial(&old, CLIENT, &opts(Duration::from_secs(1))).await;
    assert_eq!(state_of(&old, dead), State::Down);
    // The reload builds the new set while the old one lives.
    let new = Upstreams::new("web", spec(&[dead, refused()]), table.clone());
    drop(old);
    assert_eq!(state_of(&new, dead), State::Down);
    assert_eq!(new.status()[0].dial_failures, 1);
}

#[tokio::test]
async fn host_names_give_a_server_per_address() {
    let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = live.local_addr().unwrap().port();
    let s = UpstreamSpec::single(format!("localhost:{port}").parse().unwrap());
    let set = set(s);
    assert!(set.targets().is_empty(), "names resolve at the first use");
    let d = dial(&set, CLIENT, &opts(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(d.addr, live.local_addr().unwrap());
    let names: Vec<String> = set.status().into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&format!("localhost:{port}@127.0.0.1:{port}")),
        "{names:?}"
    );
}

fn checked(addrs: &[SocketAddr], rise: u32, fall: u32) -> UpstreamSpec {
    let mut s = spec(addrs);
    s.health_check = Some(HealthCheck {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        rise,
        fall,
    });
    s
}

/// Polls `set` until `addr` is in `state` (at most 5 s); returns how long it took.
async fn until(set: &Upstreams, addr: SocketAddr, state: State) -> Duration {
    let t = Instant::now();
    while state_of(set, addr) != state {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{addr} never {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t.elapsed()
}

#[tokio::test]
async fn active_checks_take_a_server_down_and_bring_it_back() {
    let addr = refused();
    let set = set(checked(&[addr], 3, 2));
    let _checker = Checker::start(set.clone(), CheckOptions::default());
    until(&set, addr, State::Down).await;
    let failures = set.status()[0].check_failures;
    assert!(failures >= 1);
    let _back = tokio::net::TcpListener::bind(addr).await.unwrap();
    // rise = 3 checks 100 ms apart.
    let took = until(&set, addr, State::Up).await;
    assert!(took >= Duration::from_millis(150), "{took:?}");
    let last = set.status()[0].last_check.clone().unwrap();
    assert!(
        last.ok && last.detail.starts_with("connected in"),
        "{last:?}"
    );
}

#[tokio::test]
async fn without_checks_a_server_found_down_is_probed_back_up() {
    let addr = refused();
    let set = set(spec(&[addr]));
    let _checker = Checker::start(set.clone(), CheckOptions::default());
    let _ = dial(&set, CLIENT, &opts(Duration::from_secs(1))).await;
    assert_eq!(state_of(&set, addr), State::Down);
    let _back = tokio::net::TcpListener::bind(addr).await.unwrap();
    let took = until(&set, addr, State::Up).await;
    // A bound on "picked up without a reload", with room for a loaded 2-core machine (seen
    // failing at + 1 s while three builds ran).
    assert!(
        took <= RECOVERY_INTERVAL + Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn checks_send_a_proxy_v2_local_header_when_asked() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let set = set(checked(&[listener.local_addr().unwrap()], 1, 1));
    let opts = CheckOptions {
        proxy_header: true,
        ..CheckOptions::default()
    };
    let _checker = Checker::start(set.clone(), opts);
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, PROXY_V2_LOCAL);
    assert_eq!(&got[..12], b"\r\n\r\n\0\r\nQUIT\n", "the v2 signature");
    assert_eq!(got[12], 0x20, "version 2, command LOCAL");
}

#[test]
fn spec_display() {
    let mut s = spec(&[
        "10.0.0.1:80".parse().unwrap(),
        "10.0.0.2:80".parse().unwrap(),
    ]);
    s.servers[0].weight = 3;
    s.servers[1].backup = true;
    assert_eq!(
        s.to_string(),
        "10.0.0.1:80 weight 3, 10.0.0.2:80 backup (roundrobin)"
    );
    assert_eq!(
        UpstreamSpec::single("[fe80::1%lo]:80".parse().unwrap()).to_string(),
        "[fe80::1%lo]:80"
    );
}
