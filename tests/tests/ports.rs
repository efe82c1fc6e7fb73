//! Local ports spent by TIME_WAIT (issue 17): where the client closes first, spliced's side of
//! each upstream connection ends in TIME_WAIT, and connect() runs out of local ports to that
//! upstream. spliced runs in a namespace of its own whose `ip_local_port_range` is cut to ten
//! ports (the sysctl is per namespace; the host's stays as it is), and dials its upstream at the
//! namespace's own `fe80::2%eth0`: not a loopback address, so the default `tcp_tw_reuse=2` does
//! not reuse those ports. The dial that finds no port resets its client, is counted in
//! `spliced_upstream_port_search_dials_total` and warned about once, with the fix; applying the
//! fix (`tcp_tw_reuse=1`, in that namespace) lets the next dial through at once.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use tests::{metric, metrics_addr, scrape, set_timeouts, sh, Spliced, TempDir, Topology};

const IO: Duration = Duration::from_secs(10);

/// Accepts for up to 60 s; reads each connection to its EOF, then closes (so the client's
/// side, through spliced, closes first).
fn serve_until_eof(listener: TcpListener) {
    listener.set_nonblocking(true).unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    thread::spawn(move || {
        while Instant::now() < end {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    set_timeouts(&s, IO);
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    });
}

/// One connection through spliced where the client closes first: `true` when it ended cleanly
/// (EOF after the upstream closed), `false` when spliced reset it. The reset can come so soon
/// after the handshake (the dial fails at once with no port free) that `connect`, the write or
/// the shutdown already reports it.
fn client_closes_first(addr: SocketAddr) -> bool {
    let was_reset = |e: &std::io::Error, what: &str| match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::NotConnected => false,
        _ => panic!("{what} through spliced: {e}"),
    };
    let mut s = match TcpStream::connect_timeout(&addr, IO) {
        Ok(s) => s,
        Err(e) => return was_reset(&e, "connect"),
    };
    set_timeouts(&s, IO);
    if let Err(e) = s.write_all(b"x").and_then(|()| s.shutdown(Shutdown::Write)) {
        return was_reset(&e, "write and shutdown");
    }
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => was_reset(&e, "reading"),
    }
}

fn sysctl(topo: &Topology, setting: &str) {
    sh(&["ip", "netns", "exec", &topo.netns, "sysctl", "-qw", setting]);
}

#[test]
fn ports_spent_by_time_wait_are_warned_once_counted_and_fixed_by_tw_reuse() {
    let topo = Topology::new();
    let upstream = topo.listen();
    let port = upstream.local_addr().unwrap().port();
    serve_until_eof(upstream);
    let (_, inside) = topo.ipv4();
    let dir = TempDir::new();
    let config = dir.write_file(
        "spliced.toml",
        &format!(
            "mode = \"copy\"\nmetrics = \"{inside}:0\"\n\n[[route]]\nname = \"app\"\n\
             listen = \"{inside}:0\"\nupstream = \"[fe80::2%eth0]:{port}\"\n"
        ),
    );
    let spliced = Spliced::try_start_in_netns(&topo.netns, &["--config", &config], 1)
        .unwrap_or_else(|e| panic!("spliced did not start ({:?}):\n{}", e.status, e.log));
    let metrics = metrics_addr(&spliced);
    // After the listeners are bound, so they keep the ports they have.
    sysctl(&topo, "net.ipv4.ip_local_port_range=40000 40009");
    sysctl(&topo, "net.ipv4.tcp_tw_reuse=2");
    let mut served = 0;
    while client_closes_first(spliced.addr()) {
        served += 1;
        assert!(served <= 10, "ten ports, yet {served} dials found one");
    }
    assert!(served >= 5, "only {served} dials before the ports ran out");
    assert!(!client_closes_first(spliced.addr()), "a port came free");
    let log = spliced.wait_log("dials are slow finding a free local port", 1, IO);
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("dials are slow finding a free local port"))
        .collect();
    assert_eq!(warnings.len(), 1, "warned once:\n{log}");
    for part in [
        "no local port was free",
        "sysctl -w net.ipv4.tcp_tw_reuse=1",
        "now 2: loopback addresses only",
        "ip_local_port_range 40000 40009",
        "more than 10 connections a minute to one upstream address",
        "server=[fe80::2%eth0]",
    ] {
        assert!(
            warnings[0].contains(part),
            "{part:?} missing: {}",
            warnings[0]
        );
    }
    let series = format!(
        "spliced_upstream_port_search_dials_total{{route=\"app\",server=\"[fe80::2%eth0]:{port}\"}}"
    );
    assert_eq!(metric(&scrape(metrics), &series), 2);
    // The fix: TIME_WAIT ports 1 s old (tcp_tw_reuse_delay) are taken again, link-local too;
    // each of the ports spent above once (the ones this loop leaves are younger than 1 s).
    sysctl(&topo, "net.ipv4.tcp_tw_reuse=1");
    thread::sleep(Duration::from_millis(1200));
    for i in 0..served {
        assert!(
            client_closes_first(spliced.addr()),
            "connection {i} after tcp_tw_reuse=1 was reset:\n{}",
            spliced.log()
        );
    }
    assert_eq!(metric(&scrape(metrics), &series), 2);
}
