//! The source rules through the daemon: `xdp`, `allow`, `deny`, `syn_rate` in a configuration
//! file, spliced running in the server namespace with its XDP front on the veth, real clients in
//! another namespace; the same rules at accept over loopback; counters in metrics and status;
//! reloads; `spliced check`.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use tests::{hup, metric, metrics_addr, scrape, sh, spliced_bin, xdp_net::*, Spliced, TempDir};

const WAIT: Duration = Duration::from_secs(10);

/// Writes `spliced.toml` in `dir`: the control socket, metrics on 127.0.0.1:0, then `body`.
fn write_config(dir: &TempDir, body: &str) -> String {
    let text = format!(
        "control_socket = \"{}\"\nmetrics = \"127.0.0.1:0\"\nmode = \"copy\"\n{body}",
        dir.socket()
    );
    dir.write_file("spliced.toml", &text)
}

/// An upstream that answers every connection with "hello" and closes, in namespace `ns` (or
/// here, with `None`), on `[::]:0`; runs for at most 60 s.
fn upstream(ns: Option<&str>) -> SocketAddr {
    let bind = || TcpListener::bind("[::]:0").expect("bind the upstream");
    let listener = match ns {
        Some(ns) => Net::run_in(ns, bind),
        None => bind(),
    };
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.write_all(b"hello");
                }
                Err(_) => thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    addr
}

/// Reads what the forwarder passes on within 3 s.
fn read_all(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(buf)
}

/// One scrape of `addr`, from namespace `ns` (or here).
fn scrape_in(ns: Option<&str>, addr: SocketAddr) -> String {
    match ns {
        Some(ns) => Net::run_in(ns, move || scrape(addr)),
        None => scrape(addr),
    }
}

fn refused(route: &str, reason: &str, place: &str) -> String {
    format!("spliced_refused_total{{route=\"{route}\",reason=\"{reason}\",at=\"{place}\"}}")
}

/// `spliced status --socket SOCKET` output.
fn status(socket: &str) -> String {
    let out = Command::new(spliced_bin())
        .args(["status", "--socket", socket])
        .output()
        .expect("spliced status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn start(net: &Net, config: &str) -> Spliced {
    Spliced::try_start_in_netns(&net.server, &["--config", config], 1)
        .unwrap_or_else(|e| panic!("spliced did not start: {e:?}"))
}

fn route_toml(listen: &str, upstream: SocketAddr, rules: &str) -> String {
    format!("[[route]]\nname = \"r\"\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\n{rules}\n")
}

/// The daemon with `xdp = ["vs"]`: an allowed IPv4 and IPv6 source is forwarded; a denied
/// one gets no SYN-ACK, nothing reaches the server's TCP stack, and the XDP drops (one per SYN)
/// show in the metrics and in `spliced status`.
#[test]
fn daemon_xdp_acl() {
    if !can_run() {
        return;
    }
    let net = Net::new();
    let dir = TempDir::new();
    let up = upstream(Some(&net.server));
    let up = SocketAddr::new("::1".parse().unwrap(), up.port());
    let rules = format!(
        "allow = [\"198.51.100.0/25\", \"2001:db8:15::/64\"]\ndeny = [\"{DENIED4}/32\", \"{DENIED6}/128\"]\n"
    );
    let config = write_config(
        &dir,
        &format!("xdp = [\"vs\"]\n{}", route_toml("[::]:0", up, &rules)),
    );
    let spliced = start(&net, &config);
    spliced.wait_log("XDP front attached to vs in native mode", 1, WAIT);
    let port = spliced.listening[0].port();
    let client = net.client.clone();
    let got = Net::run_in(&client, move || {
        [(ALLOWED4, S4), (ALLOWED6, S6)].map(|(src, dst)| {
            let s = connect_from(src, SocketAddr::new(dst.parse().unwrap(), port), WAIT)
                .expect("an allowed source connects");
            read_all(&mut TcpStream::from(s)).expect("read")
        })
    });
    assert_eq!(got, [b"hello".to_vec(), b"hello".to_vec()]);
    let server = ["TcpExtListenDrops", "TcpPassiveOpens"];
    let syns = ["TcpActiveOpens", "TcpExtTCPSynRetrans"];
    let (s0, c0) = (
        Net::counters(&net.server, &server),
        Net::counters(&net.client, &syns),
    );
    let refused_all = Net::run_in(&client, move || {
        [(DENIED4, S4), (DENIED6, S6), (OUTSIDE4, S4_OTHER)].map(|(src, dst)| {
            let dest = SocketAddr::new(dst.parse().unwrap(), port);
            connect_from(src, dest, Duration::from_millis(1500)).map(drop)
        })
    });
    for r in refused_all {
        let e = r.expect_err("a refused source must not connect");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    }
    assert_eq!(
        Net::counters(&net.server, &server),
        s0,
        "nothing reached the stack"
    );
    let c1 = Net::counters(&net.client, &syns);
    let sent: u64 = c1.iter().zip(&c0).map(|(a, b)| a - b).sum();
    let metrics = scrape_in(Some(&net.server), metrics_addr(&spliced));
    assert_eq!(
        metric(&metrics, &refused("r", "acl", "xdp")),
        sent,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, &refused("r", "acl", "accept")),
        0,
        "{metrics}"
    );
    let table = Net::run_in(&net.server, {
        let socket = dir.socket();
        move || status(&socket)
    });
    let line = table
        .lines()
        .find(|l| l.contains("refused") && l.contains(" r "))
        .unwrap_or_else(|| panic!("no refusals line for route r:\n{table}"));
    assert!(
        line.contains(&format!("acl {sent} (xdp {sent}, accept 0)")),
        "{table}"
    );
}

/// Without `xdp`, the same rules hold at accept: over loopback a denied client is closed at
/// once (a reset, no bytes), an allowed one is forwarded; the refusal is counted.
#[test]
fn loopback_rules_at_accept() {
    let dir = TempDir::new();
    let up = upstream(None);
    let up = SocketAddr::new("::1".parse().unwrap(), up.port());
    let config = write_config(
        &dir,
        &route_toml("127.0.0.1:0", up, "deny = [\"127.0.0.2/32\"]\n"),
    );
    let spliced = Spliced::try_start(&["--config", &config], 1).expect("spliced starts");
    let addr = spliced.listening[0];
    let mut ok = connect_from("127.0.0.1", addr, WAIT)
        .map(TcpStream::from)
        .unwrap();
    assert_eq!(read_all(&mut ok).unwrap(), b"hello");
    let t = Instant::now();
    // Reset at once: at connect(2) already, or at the first read.
    let r = connect_from("127.0.0.2", addr, WAIT).and_then(|s| read_all(&mut TcpStream::from(s)));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "closed at once: {:?}",
        t.elapsed()
    );
    match r {
        Ok(bytes) => assert!(bytes.is_empty(), "a denied client got {bytes:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    let metrics = scrape_in(None, metrics_addr(&spliced));
    assert_eq!(
        metric(&metrics, &refused("r", "acl", "accept")),
        1,
        "{metrics}"
    );
    spliced.wait_log("refused at accept", 1, WAIT);
}

/// `syn_rate` at accept: a burst of twice the rate passes, the rest is refused.
#[test]
fn loopback_syn_rate_at_accept() {
    let dir = TempDir::new();
    let up = upstream(None);
    let config = write_config(&dir, &route_toml("127.0.0.1:0", up, "syn_rate = 5\n"));
    let spliced = Spliced::try_start(&["--config", &config], 1).expect("spliced starts");
    let addr = spliced.listening[0];
    let mut served = 0u64;
    for _ in 0..20 {
        // A refused connection is reset at once, sometimes before connect(2) has returned.
        let served_one = TcpStream::connect_timeout(&addr, WAIT)
            .and_then(|mut s| read_all(&mut s))
            .is_ok_and(|b| b == b"hello");
        served += u64::from(served_one);
    }
    // 10 of the burst, and at most a token or two more for the time the 20 took.
    assert!((10..=12).contains(&served), "{served} of 20 served");
    let metrics = scrape_in(None, metrics_addr(&spliced));
    assert_eq!(
        metric(&metrics, &refused("r", "syn_rate", "accept")),
        20 - served,
        "{metrics}"
    );
}

/// The reload tests' start: the namespaces, a directory, the upstream in the server namespace,
/// and a route on `[::]` to it that denies [`DENIED4`]; `None` where the XDP tests cannot run.
fn denying_route() -> Option<(Net, TempDir, String)> {
    if !can_run() {
        return None;
    }
    let net = Net::new();
    let dir = TempDir::new();
    let up = upstream(Some(&net.server));
    let route = route_toml("[::]:0", up, &format!("deny = [\"{DENIED4}/32\"]\n"));
    Some((net, dir, route))
}

/// A reload attaches to an interface added to `xdp` and detaches from one removed; the rules
/// themselves change in place.
#[test]
fn reload_adds_and_removes_the_interface() {
    let Some((net, dir, route)) = denying_route() else {
        return;
    };
    let config = write_config(&dir, &route);
    let mut spliced = start(&net, &config);
    let xdp_on = |net: &Net| sh(&["ip", "-n", &net.server, "link", "show", "vs"]).contains("xdp");
    assert!(!xdp_on(&net));
    write_config(&dir, &format!("xdp = [\"vs\"]\n{route}"));
    hup(&spliced, "XDP front attached to vs", 1);
    assert!(xdp_on(&net));
    write_config(&dir, &route);
    hup(&spliced, "XDP front detached from vs", 1);
    assert!(!xdp_on(&net));
    write_config(&dir, &format!("xdp = [\"vs\"]\n{route}"));
    hup(&spliced, "XDP front attached to vs", 2);
    let status = spliced.signal_and_wait(libc::SIGTERM, WAIT);
    assert!(status.success(), "{status}");
    assert!(!xdp_on(&net), "detached on exit");
}

/// `xdp_mode = "generic"` attaches in generic mode where the driver has native XDP (a veth);
/// a reload that drops it re-attaches in native mode, and the rules hold in both.
#[test]
fn xdp_mode_generic_and_back_at_reload() {
    let Some((net, dir, route)) = denying_route() else {
        return;
    };
    let body = format!("xdp = [\"vs\"]\n{route}");
    let config = write_config(&dir, &format!("xdp_mode = \"generic\"\n{body}"));
    let spliced = start(&net, &config);
    spliced.wait_log("XDP front attached to vs in generic mode", 1, WAIT);
    let link = || sh(&["ip", "-n", &net.server, "link", "show", "vs"]);
    assert!(link().contains("xdpgeneric"), "{}", link());
    assert!(
        status(&dir.socket()).contains("XDP front on vs (generic)"),
        "{}",
        status(&dir.socket())
    );
    let port = spliced.listening[0].port();
    let denied = |net: &Net| {
        let dest = SocketAddr::new(S4.parse().unwrap(), port);
        Net::run_in(&net.client, move || {
            connect_from(DENIED4, dest, Duration::from_millis(1500)).map(drop)
        })
    };
    let e = denied(&net).expect_err("denied in generic mode");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "no SYN-ACK: {e}");
    write_config(&dir, &body);
    hup(&spliced, "XDP front attached to vs in native mode", 1);
    assert!(
        link().contains(" xdp ") || link().contains("prog/xdp"),
        "{}",
        link()
    );
    assert!(!link().contains("xdpgeneric"), "{}", link());
    let e = denied(&net).expect_err("denied in native mode");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "no SYN-ACK: {e}");
}

/// A second spliced on the same interface stops with an error naming the program there.
#[test]
fn occupied_interface_stops_the_daemon() {
    if !can_run() {
        return;
    }
    let net = Net::new();
    let (a, b) = (TempDir::new(), TempDir::new());
    let up = upstream(Some(&net.server));
    let body = format!("xdp = [\"vs\"]\n{}", route_toml("[::]:0", up, ""));
    let _first = start(&net, &write_config(&a, &body));
    let second =
        Spliced::try_start_in_netns(&net.server, &["--config", &write_config(&b, &body)], 1);
    let e = second.err().expect("the second spliced must not start");
    assert!(
        e.log
            .contains("interface vs already carries XDP program spliced_xdp"),
        "{}",
        e.log
    );
    assert_ne!(e.status.and_then(|s| s.code()), Some(0));
}

/// `spliced check` lists the effective rules; bad prefixes are reported at their position.
#[test]
fn check_lists_rules_and_reports_bad_prefixes() {
    let dir = TempDir::new();
    let config = write_config(
        &dir,
        "xdp = [\"lo\"]\nxdp_mode = \"generic\"\n\
         [[route]]\nname = \"admin\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n\
         allow = [\"198.51.100.0/24\", \"2001:db8:1::/48\"]\ndeny = [\"198.51.100.66/32\"]\n\
         syn_rate = 20\n",
    );
    let out = Command::new(spliced_bin())
        .args(["check", "--config", &config])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "xdp: the XDP front on lo in generic mode",
        "route admin: deny 198.51.100.66/32",
        "route admin: allow only 198.51.100.0/24, 2001:db8:1::/48",
        "route admin: syn_rate 20/s per source (IPv4 /32, IPv6 /64), bursts up to 40",
    ] {
        assert!(stdout.contains(want), "{want:?} not in:\n{stdout}");
    }
    let config = write_config(
        &dir,
        "xdp = [\"eth*\"]\n[[route]]\nname = \"admin\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n\
         allow = []\ndeny = [\"198.51.100.0/24\", \"198.51.100.1/24\"]\nsyn_rate = 0\n",
    );
    let out = Command::new(spliced_bin())
        .args(["check", "--config", &config])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for want in [
        ":4:8: xdp: \"eth*\": interface names are fixed, not patterns",
        ":9:9: route[0].allow: an empty allow list would refuse every source",
        ":10:28: route[0].deny: 198.51.100.1/24 has bits set below the /24 prefix: write 198.51.100.0/24",
        ":11:12: route[0].syn_rate: 0 is out of range",
    ] {
        assert!(stderr.contains(want), "{want:?} not in:\n{stderr}");
    }
}
