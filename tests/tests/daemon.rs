//! spliced as a host daemon, run as root against the real kernel: per-route limits and idle
//! timeouts, `spliced status` over the control socket, Prometheus metrics.
//!
//! - A route's `max_connections`: the connection past the limit is reset at once and counted;
//!   a slot freed is usable again.
//! - `idle_timeout`: an idle connection is reset after it on every data path (sockmap from the
//!   verdict's per-socket last-activity time), one that trickles bytes in both directions
//!   outlives it.
//! - `spliced status`: the live connection with its route, both addresses, data path, exact
//!   bytes each way, age and idle time; the socket is mode 0600 and a non-root user is refused.
//! - Metrics: off unless configured; per route connections, failures by reason, bytes each way
//!   of closed connections (exact), closed connections per data path, the path in use.
//!
//! Each test has its own namespace, temporary directory, control socket and ports; every wait
//! is bounded.
use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use tests::{
    accept, closed_within, per_mode, read_exact, set_timeouts, spliced_bin, Payload, Spliced,
    Topology,
};

const ACCEPT: Duration = Duration::from_secs(10);
const LOG_WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A temporary directory with the daemon's configuration file and control socket; removed on
/// drop.
struct Dir {
    path: PathBuf,
}

impl Dir {
    fn new() -> Dir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("spliced-daemon-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Dir { path }
    }

    fn socket(&self) -> String {
        self.path.join("control.sock").to_str().unwrap().to_owned()
    }

    fn config(&self) -> String {
        self.path.join("spliced.toml").to_str().unwrap().to_owned()
    }

    /// Writes the configuration: `top` keys, the control socket, then one route per entry of
    /// `routes` (name, upstream, extra route keys), all listening on 127.0.0.1:0.
    fn write(&self, mode: &str, top: &str, routes: &[(&str, &str, &str)]) -> String {
        let mut text = format!(
            "mode = \"{mode}\"\ncontrol_socket = \"{}\"\n{top}\n",
            self.socket()
        );
        for (name, upstream, extra) in routes {
            text += &format!(
                "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n{extra}\n"
            );
        }
        fs::write(self.config(), text).unwrap();
        self.config()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The metrics address the daemon logged.
fn metrics_addr(spliced: &Spliced) -> SocketAddr {
    let log = spliced.wait_log("Prometheus text on http://", 1, LOG_WAIT);
    let line = log
        .lines()
        .find(|l| l.contains("Prometheus text on"))
        .unwrap();
    let rest = line.split("http://").nth(1).unwrap();
    rest.split('/').next().unwrap().parse().unwrap()
}

/// GET /metrics; returns the body after checking the status and content type.
fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    set_timeouts(&s, Duration::from_secs(10));
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read the metrics");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

/// The value of the sample `series` (`name{labels}`) in a scrape.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .parse()
        .unwrap()
}

/// Scrapes until `series` has `value` (at most 10 s); returns the last scrape.
fn wait_metric(addr: SocketAddr, series: &str, value: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(addr);
        if metric(&text, series) == value {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is not {value} after 10 s:\n{text}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `spliced status ARGS` (as `user`, when given, through runuser); returns (exit code,
/// stdout, stderr).
fn status(args: &[&str], user: Option<&str>) -> (Option<i32>, String, String) {
    let bin = spliced_bin();
    let mut cmd = match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--"]).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let out = cmd
        .arg("status")
        .args(args)
        .output()
        .expect("run spliced status");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The status rows (fields split on whitespace) of connections from `client`.
fn status_row(socket: &str, client: SocketAddr) -> Option<Vec<String>> {
    let (code, out, err) = status(&["--socket", socket], None);
    assert_eq!(code, Some(0), "status failed: {err}");
    out.lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|f| f.get(1).map(String::as_str) == Some(&client.to_string()))
}

fn seconds(field: &str) -> f64 {
    field
        .strip_suffix('s')
        .unwrap_or_else(|| panic!("{field} is not in seconds"))
        .parse()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Per-route max_connections.

fn route_max_connections(mode: &str) {
    let topo = Topology::new();
    let dir = Dir::new();
    let listener = topo.listen();
    let upstream = topo.upstream(listener.local_addr().unwrap().port());
    let config = dir.write(
        mode,
        "metrics = \"127.0.0.1:0\"",
        &[("limited", &upstream, "max_connections = 2")],
    );
    let Some(spliced) = Spliced::start_mode(mode, &["--config", &config], 1) else {
        return;
    };
    let metrics = metrics_addr(&spliced);
    let mut held = Vec::new();
    for i in 0..2u8 {
        let mut c = spliced.connect();
        let mut s = accept(&listener, ACCEPT);
        c.write_all(&[i]).unwrap();
        assert_eq!(read_exact(&mut s, 1), [i]);
        held.push((c, s));
    }
    // The third is reset at once, not queued, and the upstream never sees it.
    // (The reset may come before connect() returns.)
    match TcpStream::connect_timeout(&spliced.addr(), Duration::from_secs(5)) {
        Ok(mut third) => {
            closed_within(&mut third, Duration::from_secs(5));
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    spliced.wait_log(
        "route connection limit (route max_connections) reached",
        1,
        LOG_WAIT,
    );
    let text = wait_metric(
        metrics,
        "spliced_connections_failed_total{route=\"limited\",reason=\"route_max_connections\"}",
        1,
    );
    assert_eq!(
        metric(&text, "spliced_connections_active{route=\"limited\"}"),
        2
    );
    assert_eq!(
        metric(&text, "spliced_connections_total{route=\"limited\"}"),
        3
    );
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "the refused client was dialed");
    listener.set_nonblocking(false).unwrap();
    // A freed slot is usable again.
    drop(held.pop());
    wait_metric(metrics, "spliced_connections_active{route=\"limited\"}", 1);
    let mut c = spliced.connect();
    let mut s = accept(&listener, ACCEPT);
    c.write_all(b"again").unwrap();
    assert_eq!(read_exact(&mut s, 5), b"again");
}
per_mode!(
    route_max_connections_refuses_the_excess,
    super::route_max_connections
);

// ---------------------------------------------------------------------------------------------
// idle_timeout.

fn idle_timeout(mode: &str) {
    let topo = Topology::new();
    let dir = Dir::new();
    let listener = topo.listen();
    let upstream = topo.upstream(listener.local_addr().unwrap().port());
    let config = dir.write(
        mode,
        "metrics = \"127.0.0.1:0\"",
        &[("idle", &upstream, "idle_timeout = \"1s\"")],
    );
    let Some(spliced) = Spliced::start_mode(mode, &["--config", &config], 1) else {
        return;
    };
    let metrics = metrics_addr(&spliced);
    // A connection that carried a little and then went quiet.
    let t = Instant::now();
    let mut quiet = spliced.connect();
    let mut quiet_s = accept(&listener, ACCEPT);
    quiet.write_all(b"hello").unwrap();
    assert_eq!(read_exact(&mut quiet_s, 5), b"hello");
    // A connection that trickles a byte each way every 200 ms for 3 s: three idle timeouts.
    let mut busy = spliced.connect();
    let mut busy_s = accept(&listener, ACCEPT);
    // The quiet one is reset after about a second (not before), both sides.
    let quiet_closed = thread::spawn(move || {
        closed_within(&mut quiet, Duration::from_secs(15));
        closed_within(&mut quiet_s, Duration::from_secs(5));
        Instant::now()
    });
    for i in 0..15u8 {
        busy.write_all(&[i]).unwrap();
        assert_eq!(read_exact(&mut busy_s, 1), [i]);
        busy_s.write_all(&[i]).unwrap();
        assert_eq!(read_exact(&mut busy, 1), [i]);
        thread::sleep(Duration::from_millis(200));
    }
    let closed_at = quiet_closed
        .join()
        .expect("the quiet connection was closed");
    let after = closed_at - t;
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}, before the idle timeout"
    );
    // The busy one, open for 3 s, still carries bytes both ways.
    busy.write_all(b"still").unwrap();
    assert_eq!(read_exact(&mut busy_s, 5), b"still");
    busy_s.write_all(b"alive").unwrap();
    assert_eq!(read_exact(&mut busy, 5), b"alive");
    let log = spliced.wait_log("end=idle timeout", 1, LOG_WAIT);
    assert_eq!(log.matches("end=idle timeout").count(), 1, "{log}");
    let text = wait_metric(
        metrics,
        "spliced_connections_failed_total{route=\"idle\",reason=\"idle_timeout\"}",
        1,
    );
    assert_eq!(
        metric(&text, "spliced_connections_active{route=\"idle\"}"),
        1
    );
}
per_mode!(
    idle_timeout_closes_only_idle_connections,
    super::idle_timeout
);

// ---------------------------------------------------------------------------------------------
// spliced status.

fn status_lists_connections(mode: &str) {
    let topo = Topology::new();
    let dir = Dir::new();
    let listener = topo.listen();
    let upstream = topo.upstream(listener.local_addr().unwrap().port());
    let config = dir.write(mode, "", &[("web", &upstream, "")]);
    let Some(spliced) = Spliced::start_mode(mode, &["--config", &config], 1) else {
        return;
    };
    let socket = dir.socket();
    let meta = fs::metadata(&socket).expect("the control socket exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "root only");

    let mut c = spliced.connect();
    let mut s = accept(&listener, ACCEPT);
    let (up, down) = (300_000usize, 1_200_000usize);
    let writer = {
        let mut c = c.try_clone().unwrap();
        thread::spawn(move || c.write_all(&vec![1u8; up]).unwrap())
    };
    assert_eq!(read_exact(&mut s, up).len(), up);
    writer.join().unwrap();
    let writer = {
        let mut s = s.try_clone().unwrap();
        thread::spawn(move || s.write_all(&vec![2u8; down]).unwrap())
    };
    assert_eq!(read_exact(&mut c, down).len(), down);
    writer.join().unwrap();
    let client = c.local_addr().unwrap();
    // Let it be idle for a moment, so that age and idle time differ measurably.
    thread::sleep(Duration::from_millis(600));
    let row = status_row(&socket, client).expect("the connection is listed");
    assert_eq!(row[0], "web");
    assert_eq!(
        row[2],
        topo.upstream(listener.local_addr().unwrap().port())
            .replace(&topo.host_if, &topo.host_if_index().to_string()),
        "{row:?}"
    );
    assert_eq!(row[3], mode);
    assert_eq!(row[4], up.to_string(), "bytes up: {row:?}");
    assert_eq!(row[5], down.to_string(), "bytes down: {row:?}");
    let (age, idle) = (seconds(&row[6]), seconds(&row[7]));
    assert!((0.5..60.0).contains(&age), "{row:?}");
    assert!(idle >= 0.4 && idle <= age, "{row:?}");
    // Traffic makes it active again.
    c.write_all(b"x").unwrap();
    assert_eq!(read_exact(&mut s, 1), b"x");
    let row = status_row(&socket, client).unwrap();
    assert!(seconds(&row[7]) < 0.4, "idle after a byte: {row:?}");
    // --config finds the same socket.
    let (code, out, err) = status(&["--config", &config], None);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("1 live connection(s)\nROUTE"), "{out}");
    // A closed connection leaves the table.
    drop((c, s));
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_row(&socket, client).is_some() {
        assert!(Instant::now() < deadline, "still listed after 10 s");
        thread::sleep(Duration::from_millis(50));
    }
}
per_mode!(
    status_lists_live_connections,
    super::status_lists_connections
);

#[test]
fn status_is_root_only_and_explains_a_missing_daemon() {
    let topo = Topology::new();
    let dir = Dir::new();
    let listener = topo.listen();
    let upstream = topo.upstream(listener.local_addr().unwrap().port());
    let config = dir.write("copy", "", &[("web", &upstream, "")]);
    let _spliced = Spliced::start_mode("copy", &["--config", &config], 1).unwrap();
    // The directory is private to the test's root too: let nobody reach the socket's
    // permission check itself.
    fs::set_permissions(&dir.path, fs::Permissions::from_mode(0o755)).unwrap();
    let (code, _, err) = status(&["--socket", &dir.socket()], Some("nobody"));
    assert_eq!(code, Some(69), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(err.contains("only root may ask"), "{err}");
    let (code, out, err) = status(&["--socket", &dir.socket()], None);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().next(), Some("0 live connection(s)"));
    // No daemon there.
    let missing = dir.path.join("nothing.sock");
    let (code, _, err) = status(&["--socket", missing.to_str().unwrap()], None);
    assert_eq!(code, Some(69));
    assert!(err.starts_with("error: cannot reach spliced at "), "{err}");
    assert!(err.contains("is spliced running?"), "{err}");
}

#[test]
fn control_socket_removed_on_exit() {
    let topo = Topology::new();
    let dir = Dir::new();
    let listener = topo.listen();
    let upstream = topo.upstream(listener.local_addr().unwrap().port());
    let config = dir.write("copy", "", &[("web", &upstream, "")]);
    let mut spliced = Spliced::start_mode("copy", &["--config", &config], 1).unwrap();
    assert!(fs::metadata(dir.socket()).is_ok());
    // A second daemon on the same socket keeps running without one and says so.
    let config2 = dir.path.join("second.toml");
    fs::copy(&config, &config2).unwrap();
    let second = Spliced::start_mode("copy", &["--config", config2.to_str().unwrap()], 1).unwrap();
    second.wait_log("another spliced answers there", 1, LOG_WAIT);
    drop(second);
    assert!(
        fs::metadata(dir.socket()).is_ok(),
        "the first daemon's socket stays"
    );
    let status = spliced.signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
    assert!(status.success());
    assert!(fs::metadata(dir.socket()).is_err(), "socket left behind");
}

// ---------------------------------------------------------------------------------------------
// Metrics.

fn metrics_count(mode: &str) {
    let topo = Topology::new();
    let dir = Dir::new();
    let listener = topo.listen();
    let upstream = topo.upstream(listener.local_addr().unwrap().port());
    // A second route whose upstream refuses: nothing listens on port 1 in the namespace.
    let config = dir.write(
        mode,
        "metrics = \"127.0.0.1:0\"",
        &[("web", &upstream, ""), ("dead", &topo.upstream(1), "")],
    );
    let Some(spliced) = Spliced::start_mode(mode, &["--config", &config], 2) else {
        return;
    };
    let metrics = metrics_addr(&spliced);
    let (up, down) = (3 << 20, 5 << 20);
    let mut c = TcpStream::connect_timeout(&spliced.listening[0], Duration::from_secs(5)).unwrap();
    set_timeouts(&c, Duration::from_secs(60));
    let mut s = accept(&listener, ACCEPT);
    let sender = {
        let mut c = c.try_clone().unwrap();
        thread::spawn(move || {
            let hash = Payload::new(up, 1).send(&mut c).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            hash
        })
    };
    let (n, hash) = tests::receive(&mut s).unwrap();
    assert_eq!((n, hash), (up, sender.join().unwrap()));
    let sent = Payload::new(down, 2).send(&mut s).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(tests::receive(&mut c).unwrap(), (down, sent));
    drop((c, s));
    let text = wait_metric(
        metrics,
        &format!("spliced_connections_closed_total{{route=\"web\",path=\"{mode}\"}}"),
        1,
    );
    assert_eq!(
        metric(&text, "spliced_bytes_total{route=\"web\",direction=\"up\"}"),
        up
    );
    assert_eq!(
        metric(
            &text,
            "spliced_bytes_total{route=\"web\",direction=\"down\"}"
        ),
        down
    );
    assert_eq!(metric(&text, "spliced_connections_total{route=\"web\"}"), 1);
    assert_eq!(
        metric(&text, "spliced_connections_active{route=\"web\"}"),
        0
    );
    assert_eq!(
        metric(
            &text,
            &format!("spliced_route_data_path{{route=\"web\",path=\"{mode}\"}}")
        ),
        1
    );
    for reason in [
        "connect",
        "client",
        "upstream",
        "idle_timeout",
        "max_connections",
    ] {
        let series =
            format!("spliced_connections_failed_total{{route=\"web\",reason=\"{reason}\"}}");
        assert_eq!(metric(&text, &series), 0, "{series}");
    }
    // A refused upstream is a failure with reason connect.
    // The daemon resets the client, which may come before connect() returns.
    match TcpStream::connect_timeout(&spliced.listening[1], Duration::from_secs(5)) {
        Ok(mut c) => {
            closed_within(&mut c, Duration::from_secs(10));
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    wait_metric(
        metrics,
        "spliced_connections_failed_total{route=\"dead\",reason=\"connect\"}",
        1,
    );
    // Anything but GET /metrics gets an error status.
    let mut s = TcpStream::connect_timeout(&metrics, Duration::from_secs(5)).unwrap();
    set_timeouts(&s, Duration::from_secs(10));
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
}
per_mode!(
    metrics_count_connections_bytes_and_failures,
    super::metrics_count
);

#[test]
fn metrics_are_off_by_default() {
    let topo = Topology::new();
    let dir = Dir::new();
    let listener = topo.listen();
    let upstream = topo.upstream(listener.local_addr().unwrap().port());
    let config = dir.write("copy", "", &[("web", &upstream, "")]);
    let spliced = Spliced::start_mode("copy", &["--config", &config], 1).unwrap();
    spliced.wait_log("control socket", 1, LOG_WAIT);
    assert!(!spliced.log().contains("metrics"), "{}", spliced.log());
    // The process's only TCP listener is the route's.
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{}/fd", spliced.pid()))
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?.to_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{}/net/{table}", spliced.pid())).unwrap();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                ports.push(u16::from_str_radix(f[1].rsplit(':').next().unwrap(), 16).unwrap());
            }
        }
    }
    assert_eq!(
        ports,
        [spliced.addr().port()],
        "listeners other than the route's"
    );
}

// ---------------------------------------------------------------------------------------------
// SIGHUP reload.

/// The address route `name` last logged it listens on.
fn route_addr(spliced: &Spliced, name: &str) -> SocketAddr {
    let needle = format!("route {name}: listening on ");
    let log = spliced.wait_log(&needle, 1, LOG_WAIT);
    let line = log.lines().rev().find(|l| l.contains(&needle)).unwrap();
    let rest = line.split(&needle).nth(1).unwrap();
    rest.split(',').next().unwrap().parse().unwrap()
}

/// Sends SIGHUP and waits for the `count`-th log line containing `outcome`.
fn hup(spliced: &Spliced, outcome: &str, count: usize) -> String {
    // SAFETY: kill on the test's own child.
    unsafe { libc::kill(spliced.pid(), libc::SIGHUP) };
    spliced.wait_log(outcome, count, LOG_WAIT)
}

fn connect_to(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    set_timeouts(&s, Duration::from_secs(60));
    s
}

fn reload_routes(mode: &str) {
    let topo = Topology::new();
    let dir = Dir::new();
    let one = topo.listen();
    let two = topo.listen();
    let up_one = topo.upstream(one.local_addr().unwrap().port());
    let up_two = topo.upstream(two.local_addr().unwrap().port());
    let config = dir.write(
        mode,
        "metrics = \"127.0.0.1:0\"",
        &[("moved", &up_one, ""), ("gone", &up_one, "")],
    );
    let Some(spliced) = Spliced::start_mode(mode, &["--config", &config], 2) else {
        return;
    };
    let (moved, gone) = (route_addr(&spliced, "moved"), route_addr(&spliced, "gone"));

    // A transfer in progress on "moved": 64 MiB up, of which the upstream has read only the
    // first MiB when the configuration changes.
    let len = 64 << 20;
    let mut c = connect_to(moved);
    let mut s = accept(&one, ACCEPT);
    let sender = {
        let mut c = c.try_clone().unwrap();
        thread::spawn(move || {
            let hash = Payload::new(len, 7).send(&mut c).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            hash
        })
    };
    let head = read_exact(&mut s, 1 << 20);

    // "moved" now goes to the second upstream, "gone" is removed, "new" is added.
    dir.write(
        mode,
        "metrics = \"127.0.0.1:0\"",
        &[
            ("moved", &up_two, ""),
            ("new", &up_one, "max_connections = 1"),
        ],
    );
    let log = hup(&spliced, "reload: configuration applied", 1);
    assert!(
        log.contains("1 route(s) added, 1 removed, 1 changed"),
        "{log}"
    );
    assert!(!log.contains("reload: metrics changed"), "{log}");
    // The established transfer finishes intact, on the old upstream.
    let mut hash = sha2_of(&head);
    let n = receive_into(&mut s, &mut hash);
    assert_eq!(n + head.len() as u64, len, "bytes after the reload");
    assert_eq!(
        finish(hash),
        sender.join().unwrap(),
        "SHA-256 across the reload"
    );
    s.write_all(b"done").unwrap();
    drop(s);
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"done");
    drop(c);
    let closed = spliced.wait_log("route=moved", 1, LOG_WAIT);
    let line = closed.lines().find(|l| l.contains("route=moved")).unwrap();
    assert!(line.contains(&format!("bytes_up={len}")), "{line}");
    assert!(line.contains("end=complete"), "{line}");

    // New connections on "moved" reach the second upstream.
    let mut c = connect_to(moved);
    let mut s = accept(&two, ACCEPT);
    c.write_all(b"to two").unwrap();
    assert_eq!(read_exact(&mut s, 6), b"to two");
    // "gone" no longer accepts.
    match TcpStream::connect_timeout(&gone, Duration::from_secs(2)) {
        Ok(_) => panic!("the removed route still accepts on {gone}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
    }
    // "new" works, with its own limit.
    let new = route_addr(&spliced, "new");
    let mut n1 = connect_to(new);
    let mut s1 = accept(&one, ACCEPT);
    n1.write_all(b"new").unwrap();
    assert_eq!(read_exact(&mut s1, 3), b"new");
    match TcpStream::connect_timeout(&new, Duration::from_secs(5)) {
        Ok(mut extra) => {
            closed_within(&mut extra, Duration::from_secs(5));
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    wait_metric(
        metrics_addr(&spliced),
        "spliced_connections_failed_total{route=\"new\",reason=\"route_max_connections\"}",
        1,
    );
}
per_mode!(reload_starts_stops_and_changes_routes, super::reload_routes);

fn sha2_of(bytes: &[u8]) -> sha2::Sha256 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(bytes);
    h
}

/// Reads `r` to EOF into `hash`; returns the byte count.
fn receive_into(r: &mut TcpStream, hash: &mut sha2::Sha256) -> u64 {
    use sha2::Digest;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = match r.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r.expect("read the upload"),
        };
        if n == 0 {
            return total;
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
}

fn finish(hash: sha2::Sha256) -> [u8; 32] {
    use sha2::Digest;
    hash.finalize().into()
}

#[test]
fn reload_with_errors_keeps_the_running_configuration() {
    let topo = Topology::new();
    let dir = Dir::new();
    let listener = topo.listen();
    let upstream = topo.upstream(listener.local_addr().unwrap().port());
    let config = dir.write("copy", "", &[("web", &upstream, "")]);
    let spliced = Spliced::start_mode("copy", &["--config", &config], 1).unwrap();
    let web = spliced.addr();

    // Two mistakes: both are logged with file:line:column, nothing changes.
    let broken = format!(
        "mode = \"copy\"\ncontrol_socket = \"{}\"\nmax_conections = 5\n[[route]]\nname = \"web\"\n\
         listen = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nidle_timeout = \"0s\"\n",
        dir.socket()
    );
    fs::write(&config, broken).unwrap();
    let log = hup(&spliced, "still running the previous configuration", 1);
    assert!(
        log.contains(&format!(
            "reload: {config}:3:1: max_conections: unknown key; did you mean `max_connections`?"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "reload: {config}:8:16: route[0].idle_timeout: must be more than 0"
        )),
        "{log}"
    );
    assert!(log.contains("reload: 2 error(s); still running"), "{log}");

    // A new route whose address is taken: not applied either, the old routes stay.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let text = format!(
        "mode = \"copy\"\ncontrol_socket = \"{}\"\n[[route]]\nname = \"web\"\n\
         listen = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n[[route]]\nname = \"busy\"\n\
         listen = \"{taken_addr}\"\nupstream = \"{upstream}\"\n",
        dir.socket()
    );
    fs::write(&config, text).unwrap();
    let log = hup(&spliced, "still running the previous configuration", 2);
    assert!(
        log.contains(&format!(
            "reload: route busy: cannot listen on {taken_addr}"
        )),
        "{log}"
    );
    assert!(!log.contains("route busy: listening"), "{log}");
    // The running route still forwards, and the daemon is alive.
    let mut c = connect_to(web);
    let mut s = accept(&listener, ACCEPT);
    c.write_all(b"still here").unwrap();
    assert_eq!(read_exact(&mut s, 10), b"still here");
    assert!(!spliced.log().contains("reload: configuration applied"));
}

#[test]
fn sighup_without_a_config_file_changes_nothing() {
    let topo = Topology::new();
    let listener = topo.listen();
    let upstream = topo.upstream(listener.local_addr().unwrap().port());
    let mut spliced = Spliced::route("copy", &upstream, &[]).unwrap();
    hup(&spliced, "SIGHUP: nothing to reload (no --config file)", 1);
    spliced.assert_running();
    let mut c = spliced.connect();
    let mut s = accept(&listener, ACCEPT);
    c.write_all(b"ok").unwrap();
    assert_eq!(read_exact(&mut s, 2), b"ok");
}

// ---------------------------------------------------------------------------------------------
// systemd: socket activation and readiness notifications.

/// A process with its stderr captured; SIGTERM then SIGKILL on drop.
struct Child {
    child: std::process::Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Child {
    fn spawn(cmd: &mut Command) -> Child {
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = log.clone();
        thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        Child { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + LOG_WAIT;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log within {LOG_WAIT:?}:\n{log}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {limit:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            for _ in 0..100 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!("--- log ---\n{}", self.log());
        }
    }
}

/// A free port on 127.0.0.1 (bound and released; nothing else here binds explicit ports).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The next datagram on the notify socket (at most 10 s).
fn next_notification(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification within 10 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn socket_activation(mode: &str) {
    let topo = Topology::new();
    let dir = Dir::new();
    let listener = topo.listen();
    let upstream = topo.upstream(listener.local_addr().unwrap().port());
    let notify_path = dir.path.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The route's own listen address is on no interface here: binding it would fail, so a
    // working route proves the inherited socket is used.
    let config = dir.write(mode, "", &[("web", &upstream, "")]);
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("127.0.0.1:0", "192.0.2.1:8080");
    fs::write(&config, text).unwrap();
    let (web_port, spare_port) = (free_port(), free_port());
    let mut daemon = Child::spawn(
        Command::new("systemd-socket-activate")
            .arg(format!("--listen=127.0.0.1:{web_port}"))
            .arg(format!("--listen=127.0.0.1:{spare_port}"))
            .arg("--fdname=web:spare")
            .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
            .arg("--setenv=RUST_LOG=info")
            .arg(spliced_bin())
            .args(["--config", &config]),
    );
    let web: SocketAddr = ([127, 0, 0, 1], web_port).into();
    // systemd-socket-activate starts the service on the first connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        match TcpStream::connect_timeout(&web, Duration::from_secs(5)) {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "connect to {web}: {e}");
                thread::sleep(Duration::from_millis(20));
            }
        }
    };
    set_timeouts(&c, Duration::from_secs(30));
    assert_eq!(
        next_notification(&notify),
        "READY=1\nSTATUS=forwarding 1 route(s)"
    );
    let log = daemon.wait_log("socket-activated");
    assert!(
        log.contains(&format!(
            "route web: socket-activated: systemd passed 127.0.0.1:{web_port} as \"web\""
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "socket activation: socket \"spare\" (127.0.0.1:{spare_port}) matches no route name"
        )),
        "{log}"
    );
    let mut s = accept(&listener, ACCEPT);
    c.write_all(b"activated").unwrap();
    assert_eq!(read_exact(&mut s, 9), b"activated");
    s.write_all(b"reply").unwrap();
    assert_eq!(read_exact(&mut c, 5), b"reply");

    // A reload adds route "spare": it takes the second inherited socket. systemd hears
    // RELOADING (with the monotonic time) and READY again.
    let text = fs::read_to_string(&config).unwrap()
        + &format!(
            "[[route]]\nname = \"spare\"\nlisten = \"192.0.2.1:8081\"\nupstream = \"{upstream}\"\n"
        );
    fs::write(&config, text).unwrap();
    daemon.signal(libc::SIGHUP);
    let reloading = next_notification(&notify);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(
        next_notification(&notify),
        "READY=1\nSTATUS=configuration reloaded"
    );
    let mut c2 = connect_to(([127, 0, 0, 1], spare_port).into());
    let mut s2 = accept(&listener, ACCEPT);
    c2.write_all(b"spare").unwrap();
    assert_eq!(read_exact(&mut s2, 5), b"spare");
    // A failed reload is READY again too, with the reason.
    fs::write(&config, "bogus = 1\n").unwrap();
    daemon.signal(libc::SIGHUP);
    assert!(next_notification(&notify).starts_with("RELOADING=1"));
    assert_eq!(
        next_notification(&notify),
        "READY=1\nSTATUS=reload failed; running the previous configuration"
    );
    // The connection from before both reloads still works.
    c.write_all(b"after").unwrap();
    assert_eq!(read_exact(&mut s, 5), b"after");
    drop((c, s, c2, s2));

    daemon.signal(libc::SIGTERM);
    assert_eq!(next_notification(&notify), "STOPPING=1");
    let status = daemon.wait(Duration::from_secs(10));
    assert!(status.success(), "{status}\n{}", daemon.log());
}
per_mode!(
    socket_activation_and_notifications,
    super::socket_activation
);

#[test]
fn socket_activation_refuses_a_non_listening_descriptor() {
    let topo = Topology::new();
    let dir = Dir::new();
    let upstream = topo.upstream(9);
    let config = dir.write("copy", "", &[("web", &upstream, "")]);
    // A datagram socket is no TCP listener.
    let port = free_port();
    let mut daemon = Child::spawn(
        Command::new("systemd-socket-activate")
            .arg("--datagram")
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg("--fdname=web")
            .arg("--setenv=RUST_LOG=info")
            .arg(spliced_bin())
            .args(["--config", &config]),
    );
    // A datagram starts the service.
    let deadline = Instant::now() + Duration::from_secs(10);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let status = loop {
        let _ = udp.send_to(b"x", ("127.0.0.1", port));
        if let Some(status) = daemon.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running:\n{}",
            daemon.log()
        );
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    daemon.wait_log(
        "socket activation: descriptor 3 (name \"web\"): not a TCP socket; spliced takes \
         ListenStream= sockets",
    );
}

/// The shipped unit file, checked by systemd's own parser (`systemd-analyze verify`) with the
/// binary under test in place of /usr/bin/spliced; and the promises the README makes about it.
#[test]
fn unit_file_verifies() {
    let unit_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/spliced.service");
    let unit = fs::read_to_string(&unit_path).expect("packaging/spliced.service");
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStart=/usr/bin/spliced --config /etc/spliced/spliced.toml",
        "RuntimeDirectory=spliced",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "ProtectHome=yes",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line:?} missing");
    }
    let bounding = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("a capability bounding set");
    for cap in [
        "CAP_BPF",
        "CAP_NET_ADMIN",
        "CAP_NET_BIND_SERVICE",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_CHOWN",
    ] {
        assert!(
            bounding.split_whitespace().any(|c| c == cap),
            "{cap} missing: {bounding}"
        );
    }
    assert!(!bounding.contains("CAP_SYS_ADMIN"), "{bounding}");
    let dir = Dir::new();
    let copy = dir.path.join("spliced.service");
    fs::write(
        &copy,
        unit.replace("/usr/bin/spliced", spliced_bin().to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr, "", "systemd-analyze found problems");
}

// ---------------------------------------------------------------------------------------------
// Privilege drop.

/// The capabilities the running daemon keeps: CAP_NET_BIND_SERVICE (10) and CAP_NET_ADMIN (12).
const KEPT_CAPS: u64 = (1 << 10) | (1 << 12);

/// Every thread of `pid`: (tid, Uid line fields, CapEff, CapPrm, CapBnd).
fn thread_creds(pid: i32) -> Vec<(String, Vec<u32>, u64, u64, u64)> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Ok(text) = fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {text}"))
                .trim()
                .to_owned()
        };
        let hex = |key: &str| u64::from_str_radix(&field(key), 16).unwrap();
        let uids = field("Uid:")
            .split_whitespace()
            .map(|u| u.parse().unwrap())
            .collect();
        out.push((
            task.file_name().to_string_lossy().into_owned(),
            uids,
            hex("CapEff:"),
            hex("CapPrm:"),
            hex("CapBnd:"),
        ));
    }
    out
}

fn privilege_drop(mode: &str) {
    let topo = Topology::new();
    let dir = Dir::new();
    let listener = topo.listen();
    let upstream = topo.upstream(listener.local_addr().unwrap().port());
    // The socket's directory does not exist yet: spliced creates it and hands it over.
    let socket = dir.path.join("run/control.sock");
    // A small max_buffered makes sockmap hold and hand back (SO_RCVBUFFORCE) under a slow reader.
    let config = dir.write(
        mode,
        "metrics = \"127.0.0.1:0\"\nuser = \"nobody\"",
        &[(
            "web",
            &upstream,
            "max_buffered = \"64KiB\"\nidle_timeout = \"60s\"",
        )],
    );
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace(&dir.socket(), socket.to_str().unwrap());
    fs::write(&config, &text).unwrap();
    // The sockmap data path logs at debug how many bytes it held and handed back.
    let env = [("RUST_LOG", Some("info,spliced::forward::sockmap=debug"))];
    let mut spliced = match Spliced::try_start_env(&["--config", &config], &env, 1) {
        Ok(s) => s,
        Err(e) if e.log.contains("mode sockmap cannot work here") && !tests::ebpf_required() => {
            eprintln!("SKIPPED: sockmap unavailable on this machine:\n{}", e.log);
            return;
        }
        Err(e) => panic!("spliced did not start ({:?}):\n{}", e.status, e.log),
    };
    let log = spliced.wait_log("running as user nobody (uid 65534, gid 65534)", 1, LOG_WAIT);
    // CAP_BPF stays only where the kernel checks it for every bpf() command (before 6.5), and
    // only with the program loaded.
    let line = log.lines().find(|l| l.contains("running as user")).unwrap();
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let modern = (v.next().unwrap(), v.next().unwrap()) >= (6, 5);
    let kept = if line.contains("CAP_BPF") {
        assert!(mode == "sockmap" && !modern, "{release}: {line}");
        KEPT_CAPS | 1 << 39
    } else {
        KEPT_CAPS
    };
    assert!(
        line.ends_with("keeping only CAP_NET_BIND_SERVICE, CAP_NET_ADMIN")
            || line.ends_with("keeping only CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_BPF"),
        "{line}"
    );
    let creds = thread_creds(spliced.pid());
    assert!(creds.len() >= 2, "{creds:?}");
    for (tid, uids, eff, prm, bnd) in &creds {
        assert_eq!(uids, &[65534; 4], "thread {tid}");
        assert_eq!((*eff, *prm, *bnd), (kept, kept, kept), "thread {tid}");
    }
    let meta = fs::metadata(&socket).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.mode() & 0o777), (65534, 0o600));

    // 32 MiB each way; the client starts reading only after a second, so the download stalls.
    let len = 32 << 20;
    let mut c = spliced.connect();
    let s = accept(&listener, ACCEPT);
    let up = {
        let mut c = c.try_clone().unwrap();
        thread::spawn(move || {
            let h = Payload::new(len, 3).send(&mut c).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            h
        })
    };
    let down = {
        let mut s = s.try_clone().unwrap();
        thread::spawn(move || {
            let h = Payload::new(len, 4).send(&mut s).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            h
        })
    };
    let received_up = {
        let mut s = s.try_clone().unwrap();
        thread::spawn(move || tests::receive(&mut s).unwrap())
    };
    thread::sleep(Duration::from_secs(1));
    // Root asks the unprivileged daemon for its status meanwhile.
    let row = status_row(socket.to_str().unwrap(), c.local_addr().unwrap())
        .expect("the connection is listed");
    assert_eq!(row[3], mode);
    assert_eq!(tests::receive(&mut c).unwrap(), (len, down.join().unwrap()));
    assert_eq!(received_up.join().unwrap(), (len, up.join().unwrap()));
    drop((c, s));
    let log = spliced.wait_log("connection closed", 1, LOG_WAIT);
    assert!(log.contains("end=complete"), "{log}");
    if mode == "sockmap" {
        // The stall made the verdict hold: the hand-back (SO_RCVBUFFORCE) ran without root.
        let done = spliced.wait_log("sockmap connection done", 1, LOG_WAIT);
        let line = done
            .lines()
            .find(|l| l.contains("sockmap connection done"))
            .unwrap();
        let held: u64 = line
            .split("held_down=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no held_down in {line}"));
        assert!(held > 0, "the download never held: {line}");
    }

    // A reload binds a new listener, on a port below 1024, as the unprivileged user.
    // Each mode's test (they run in parallel) searches its own range.
    let base = 900 + 30 * tests::MODES.iter().position(|m| *m == mode).unwrap() as u16;
    let low = (base..base + 30)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1024");
    let text = fs::read_to_string(&config).unwrap()
        + &format!(
            "[[route]]\nname = \"later\"\nlisten = \"127.0.0.1:{low}\"\nupstream = \"{upstream}\"\n"
        );
    fs::write(&config, text).unwrap();
    hup(&spliced, "reload: configuration applied", 1);
    let mut c = connect_to(route_addr(&spliced, "later"));
    let mut s = accept(&listener, ACCEPT);
    c.write_all(b"later").unwrap();
    assert_eq!(read_exact(&mut s, 5), b"later");
    drop((c, s));
    let status = spliced.signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(
        !socket.exists(),
        "the control socket is removed by the unprivileged daemon"
    );
}
per_mode!(
    privilege_drop_keeps_only_what_is_needed,
    super::privilege_drop
);
