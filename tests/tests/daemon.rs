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
    thread,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use tests::{
    accept, assert_closed_on_connect, assert_no_connection, assert_refused, carry, closed_within,
    connect_to, free_port, http_request, hup, listening_ports, listening_sockets, metric,
    metrics_addr, per_mode, read_exact, receive_into, route_addr, scrape, set_timeouts,
    spliced_bin, status, steer_required, wait_metric, wait_until, Configured, Payload, Process,
    Spliced, TempDir, Topology,
};

const ACCEPT: Duration = Duration::from_secs(10);
const LOG_WAIT: Duration = Duration::from_secs(10);
/// The top-level key that turns the metrics endpoint on, at a port of its own.
const METRICS: &str = "metrics = \"127.0.0.1:0\"";

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
    let f = Configured::new();
    let Some(spliced) = f.start_route(mode, METRICS, "limited", "max_connections = 2") else {
        return;
    };
    let metrics = metrics_addr(&spliced);
    let mut held = Vec::new();
    for i in 0..2u8 {
        let mut c = spliced.connect();
        let mut s = accept(&f.listener, ACCEPT);
        carry(&mut c, &mut s, &[i]);
        held.push((c, s));
    }
    // The third is reset at once, not queued, and the upstream never sees it.
    // (The reset may come before connect() returns.)
    assert_closed_on_connect(spliced.addr(), Duration::from_secs(5));
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
    assert_no_connection(&f.listener, "the refused client was dialed");
    // A freed slot is usable again.
    drop(held.pop());
    wait_metric(metrics, "spliced_connections_active{route=\"limited\"}", 1);
    let mut c = spliced.connect();
    let mut s = accept(&f.listener, ACCEPT);
    carry(&mut c, &mut s, b"again");
}
per_mode!(
    route_max_connections_refuses_the_excess,
    super::route_max_connections
);

// ---------------------------------------------------------------------------------------------
// idle_timeout.

fn idle_timeout(mode: &str) {
    let f = Configured::new();
    let Some(spliced) = f.start_route(mode, METRICS, "idle", "idle_timeout = \"1s\"") else {
        return;
    };
    let metrics = metrics_addr(&spliced);
    // A connection that carried a little and then went quiet.
    let t = Instant::now();
    let mut quiet = spliced.connect();
    let mut quiet_s = accept(&f.listener, ACCEPT);
    carry(&mut quiet, &mut quiet_s, b"hello");
    // A connection that trickles a byte each way every 200 ms for 3 s: three idle timeouts.
    let mut busy = spliced.connect();
    let mut busy_s = accept(&f.listener, ACCEPT);
    // The quiet one is reset after about a second (not before), both sides.
    let quiet_closed = thread::spawn(move || {
        closed_within(&mut quiet, Duration::from_secs(15));
        closed_within(&mut quiet_s, Duration::from_secs(5));
        Instant::now()
    });
    for i in 0..15u8 {
        carry(&mut busy, &mut busy_s, &[i]);
        carry(&mut busy_s, &mut busy, &[i]);
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
    carry(&mut busy, &mut busy_s, b"still");
    carry(&mut busy_s, &mut busy, b"alive");
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
    let f = Configured::new();
    let Some(spliced) = f.start_route(mode, "", "web", "") else {
        return;
    };
    let config = f.dir.config();
    let socket = f.dir.socket();
    let meta = fs::metadata(&socket).expect("the control socket exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "root only");

    let mut c = spliced.connect();
    let mut s = accept(&f.listener, ACCEPT);
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
        f.upstream
            .replace(&f.topo.host_if, &f.topo.host_if_index().to_string()),
        "{row:?}"
    );
    assert_eq!(row[3], mode);
    assert_eq!(row[4], up.to_string(), "bytes up: {row:?}");
    assert_eq!(row[5], down.to_string(), "bytes down: {row:?}");
    let (age, idle) = (seconds(&row[6]), seconds(&row[7]));
    assert!((0.5..60.0).contains(&age), "{row:?}");
    assert!(idle >= 0.4 && idle <= age, "{row:?}");
    // Traffic makes it active again.
    carry(&mut c, &mut s, b"x");
    let row = status_row(&socket, client).unwrap();
    assert!(seconds(&row[7]) < 0.4, "idle after a byte: {row:?}");
    // --config finds the same socket.
    let (code, out, err) = status(&["--config", &config], None);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("1 live connection(s)\nROUTE"), "{out}");
    // A closed connection leaves the table.
    drop((c, s));
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || status_row(&socket, client).is_none().then_some(()),
        || "still listed after 10 s".into(),
    );
}
per_mode!(
    status_lists_live_connections,
    super::status_lists_connections
);

#[test]
fn status_is_root_only_and_explains_a_missing_daemon() {
    let f = Configured::new();
    let _spliced = f.start_route("copy", "", "web", "").unwrap();
    // The directory is private to the test's root too: let nobody reach the socket's
    // permission check itself.
    fs::set_permissions(&f.dir.path, fs::Permissions::from_mode(0o755)).unwrap();
    let (code, _, err) = status(&["--socket", &f.dir.socket()], Some("nobody"));
    assert_eq!(code, Some(69), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(err.contains("only root may ask"), "{err}");
    let (code, out, err) = status(&["--socket", &f.dir.socket()], None);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().next(), Some("0 live connection(s)"));
    // No daemon there.
    let missing = f.dir.path.join("nothing.sock");
    let (code, _, err) = status(&["--socket", missing.to_str().unwrap()], None);
    assert_eq!(code, Some(69));
    assert!(err.starts_with("error: cannot reach spliced at "), "{err}");
    assert!(err.contains("is spliced running?"), "{err}");
}

#[test]
fn control_socket_removed_on_exit() {
    let f = Configured::new();
    let mut spliced = f.start_route("copy", "", "web", "").unwrap();
    let config = f.dir.config();
    assert!(fs::metadata(f.dir.socket()).is_ok());
    // A second daemon on the same socket keeps running without one and says so.
    let config2 = f.dir.path.join("second.toml");
    fs::copy(&config, &config2).unwrap();
    let second = Spliced::start_mode("copy", &["--config", config2.to_str().unwrap()], 1).unwrap();
    second.wait_log("another spliced answers there", 1, LOG_WAIT);
    drop(second);
    assert!(
        fs::metadata(f.dir.socket()).is_ok(),
        "the first daemon's socket stays"
    );
    let status = spliced.signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
    assert!(status.success());
    assert!(fs::metadata(f.dir.socket()).is_err(), "socket left behind");
}

// ---------------------------------------------------------------------------------------------
// Metrics.

fn metrics_count(mode: &str) {
    let f = Configured::new();
    // A second route whose upstream refuses: nothing listens on port 1 in the namespace.
    let Some(spliced) = f.start(
        mode,
        METRICS,
        &[("web", &f.upstream, ""), ("dead", &f.topo.upstream(1), "")],
        2,
    ) else {
        return;
    };
    let metrics = metrics_addr(&spliced);
    let (up, down) = (3 << 20, 5 << 20);
    let mut c = connect_to(spliced.listening[0]);
    let mut s = accept(&f.listener, ACCEPT);
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
        "no_upstream",
        "client",
        "upstream",
        "idle_timeout",
        "max_connections",
    ] {
        let series =
            format!("spliced_connections_failed_total{{route=\"web\",reason=\"{reason}\"}}");
        assert_eq!(metric(&text, &series), 0, "{series}");
    }
    // A refused upstream (the route's only server) is a failure with reason no_upstream.
    // The daemon resets the client, which may come before connect() returns.
    assert_closed_on_connect(spliced.listening[1], Duration::from_secs(10));
    wait_metric(
        metrics,
        "spliced_connections_failed_total{route=\"dead\",reason=\"no_upstream\"}",
        1,
    );
    // Anything but GET /metrics gets an error status.
    let reply = http_request(metrics, b"GET / HTTP/1.1\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
}
per_mode!(
    metrics_count_connections_bytes_and_failures,
    super::metrics_count
);

#[test]
fn metrics_are_off_by_default() {
    let f = Configured::new();
    let spliced = f.start_route("copy", "", "web", "").unwrap();
    spliced.wait_log("control socket", 1, LOG_WAIT);
    assert!(!spliced.log().contains("metrics"), "{}", spliced.log());
    // The process's only TCP listener is the route's.
    let ports = listening_ports(spliced.pid());
    assert_eq!(
        ports,
        [spliced.addr().port()],
        "listeners other than the route's"
    );
}

// ---------------------------------------------------------------------------------------------
// SIGHUP reload.

fn reload_routes(mode: &str) {
    let topo = Topology::new();
    let dir = TempDir::new();
    let one = topo.listen();
    let two = topo.listen();
    let up_one = topo.upstream(one.local_addr().unwrap().port());
    let up_two = topo.upstream(two.local_addr().unwrap().port());
    let config = dir.write(
        mode,
        METRICS,
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
        METRICS,
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
    let mut hash = Sha256::new_with_prefix(&head);
    let n = receive_into(&mut s, &mut hash).expect("read the upload");
    assert_eq!(n + head.len() as u64, len, "bytes after the reload");
    assert_eq!(
        <[u8; 32]>::from(hash.finalize()),
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
    carry(&mut c, &mut s, b"to two");
    // "gone" no longer accepts.
    assert_refused(gone);
    // "new" works, with its own limit.
    let new = route_addr(&spliced, "new");
    let mut n1 = connect_to(new);
    let mut s1 = accept(&one, ACCEPT);
    carry(&mut n1, &mut s1, b"new");
    assert_closed_on_connect(new, Duration::from_secs(5));
    wait_metric(
        metrics_addr(&spliced),
        "spliced_connections_failed_total{route=\"new\",reason=\"route_max_connections\"}",
        1,
    );
}
per_mode!(reload_starts_stops_and_changes_routes, super::reload_routes);

#[test]
fn reload_with_errors_keeps_the_running_configuration() {
    let f = Configured::new();
    let spliced = f.start_route("copy", "", "web", "").unwrap();
    let config = f.dir.config();
    let web = spliced.addr();

    // Two mistakes: both are logged with file:line:column, nothing changes.
    let broken = format!(
        "mode = \"copy\"\ncontrol_socket = \"{}\"\nmax_conections = 5\n[[route]]\nname = \"web\"\n\
         listen = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nidle_timeout = \"0s\"\n",
        f.dir.socket(),
        upstream = f.upstream
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
        f.dir.socket(),
        upstream = f.upstream
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
    let mut s = accept(&f.listener, ACCEPT);
    carry(&mut c, &mut s, b"still here");
    assert!(!spliced.log().contains("reload: configuration applied"));
}

#[test]
fn sighup_without_a_config_file_changes_nothing() {
    let topo = Topology::new();
    let (listener, upstream) = topo.upstream_listener();
    let mut spliced = Spliced::route("copy", &upstream, &[]).unwrap();
    hup(&spliced, "SIGHUP: nothing to reload (no --config file)", 1);
    spliced.assert_running();
    let mut c = spliced.connect();
    let mut s = accept(&listener, ACCEPT);
    carry(&mut c, &mut s, b"ok");
}

/// The directories of `pid`'s threads, `/proc/PID/task/TID`.
fn tasks(pid: i32) -> Vec<PathBuf> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| t.path())
        .collect()
}

/// The threads of `pid` that tokio's runtime runs (its workers, and blocking-pool threads
/// while they live: they go after a second idle).
fn runtime_threads(pid: i32) -> usize {
    tasks(pid)
        .iter()
        .filter(|t| fs::read_to_string(t.join("comm")).is_ok_and(|c| c.starts_with("tokio-r")))
        .count()
}

#[test]
fn workers_sets_the_runtime_threads_and_waits_for_a_restart() {
    let f = Configured::new();
    let spliced = f.start_route("copy", "workers = 1", "web", "").unwrap();
    let mut c = spliced.connect();
    let mut s = accept(&f.listener, ACCEPT);
    carry(&mut c, &mut s, b"one worker");
    carry(&mut s, &mut c, b"carries");
    // Blocking-pool threads (the start-up's file reads) leave after a second idle.
    let deadline = Instant::now() + Duration::from_secs(10);
    while runtime_threads(spliced.pid()) != 1 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        runtime_threads(spliced.pid()),
        1,
        "tokio threads with workers = 1"
    );
    // One lane: the route accepts on one socket.
    assert_eq!(listening_sockets(spliced.pid()).len(), 1);
    f.dir
        .write("copy", "workers = 3", &[("web", &f.upstream, "")]);
    let log = hup(&spliced, "reload: configuration applied", 1);
    assert!(
        log.contains("reload: workers changed; it takes effect only when spliced restarts"),
        "{log}"
    );
    carry(&mut c, &mut s, b"still one");
}

/// Each lane thread's allowed cores (`Cpus_allowed_list`), by lane number.
fn lane_cores(pid: i32) -> Vec<String> {
    let mut lanes: Vec<(usize, String)> = tasks(pid)
        .iter()
        .filter_map(|t| {
            let comm = fs::read_to_string(t.join("comm")).ok()?;
            let lane = comm.trim().strip_prefix("lane-")?.parse().ok()?;
            let status = fs::read_to_string(t.join("status")).ok()?;
            let list = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
            Some((lane, list.trim().to_string()))
        })
        .collect();
    lanes.sort();
    lanes.into_iter().map(|(_, cores)| cores).collect()
}

/// With one lane per core each lane is pinned to its own core (this test's cores are the
/// daemon's: 0 to N-1), a connection on a `copy` route keeps its lane pinned for a short
/// exchange and leaves it to the scheduler once it carries a bulk transfer (256 KiB one way),
/// until it ends, and `pin_lanes = false` leaves every lane on every core.
#[test]
fn lanes_are_pinned_to_their_cores_but_not_for_bulk() {
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let all = lane_cores(std::process::id() as i32);
    assert!(all.is_empty(), "this test process has no lanes: {all:?}");
    let f = Configured::new();
    let spliced = f.start_route("copy", "", "web", "").unwrap();
    if cores < 2 {
        spliced.wait_log("listening on", 1, LOG_WAIT);
        assert!(!spliced.log().contains("lanes pinned"), "{}", spliced.log());
        return;
    }
    let log = spliced.wait_log("lanes pinned to cores", 1, LOG_WAIT);
    let own: Vec<String> = (0..cores).map(|c| c.to_string()).collect();
    assert_eq!(lane_cores(spliced.pid()), own, "{log}");
    let mut c = spliced.connect();
    let mut s = accept(&f.listener, ACCEPT);
    // A short exchange stays on its pinned lane; past 256 KiB one way it is a bulk transfer.
    carry(&mut c, &mut s, b"bulk?");
    assert_eq!(
        lane_cores(spliced.pid()),
        own,
        "a short exchange unpinned its lane"
    );
    let chunk = vec![b'b'; 64 * 1024];
    for _ in 0..5 {
        carry(&mut s, &mut c, &chunk);
    }
    let unpinned = lane_cores(spliced.pid());
    assert!(
        unpinned.iter().filter(|l| !own.contains(l)).count() == 1,
        "one lane carries the bulk transfer, unpinned: {unpinned:?}"
    );
    drop((c, s));
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || (lane_cores(spliced.pid()) == own).then_some(()),
        || {
            format!(
                "the lane was not pinned again: {:?}",
                lane_cores(spliced.pid())
            )
        },
    );
    drop(spliced);
    let spliced = f
        .start_route("copy", "pin_lanes = false", "web", "")
        .unwrap();
    wait_for_lanes(&f.dir.socket(), cores);
    let lanes = lane_cores(spliced.pid());
    assert_eq!(lanes.len(), cores);
    assert!(lanes.iter().all(|l| !own.contains(l)), "{lanes:?}");
    assert!(!spliced.log().contains("lanes pinned"), "{}", spliced.log());
}

// ---------------------------------------------------------------------------------------------
// Accepting on the lanes.

/// The log once each of `routes` said how it accepts (with more than one core: "accepting on
/// one socket: why" before its "listening on" line, "accepting on N lanes" just after it).
fn accepting_lines(spliced: &Spliced, routes: &[&str], cores: usize) -> String {
    if cores < 2 {
        return spliced.log();
    }
    for name in routes {
        spliced.wait_log(&format!("route {name}: accepting on "), 1, LOG_WAIT);
    }
    spliced.log()
}

/// The connections the steering handed to the lanes, over all `cores` of them (metrics `text`).
fn steered_total(text: &str, cores: usize) -> u64 {
    (0..cores)
        .map(|l| {
            let series = format!("spliced_lane_steered_total{{lane=\"{l}\"}}");
            metric(text, &series)
        })
        .sum()
}

/// Waits until the lanes accept (`spliced status` shows their line; at most 20 s): a connection
/// before that is accepted on the shared runtime and left to the kernel's hash, uncounted.
fn wait_for_lanes(socket: &str, cores: usize) {
    let line = format!("accepting on {cores} lanes: live ");
    let now = || status(&["--socket", socket], None).1;
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || now().lines().any(|l| l.starts_with(&line)).then_some(()),
        || format!("the lanes did not start within 20 s; status:\n{}", now()),
    );
}

/// With more than one core a route listens with a socket per core, a `SO_REUSEPORT` group whose
/// connections the steering program hands to the lanes; every connection through it is
/// carried, a second daemon on its port still fails with "address in use", and a reload that
/// removes the route closes every socket of the group.
#[test]
fn a_route_accepts_on_a_socket_per_lane() {
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let f = Configured::new();
    let spliced = f.start_route("copy", METRICS, "web", "").unwrap();
    let addr = route_addr(&spliced, "web");
    let sockets = || {
        listening_sockets(spliced.pid())
            .into_iter()
            .filter(|p| *p == addr.port())
            .count()
    };
    let steered = format!("route web: accepting on {cores} lanes, each connection on the lane");
    let log = accepting_lines(&spliced, &["web"], cores);
    let is_steered = cores > 1 && (steer_required() || log.contains(&steered));
    if is_steered {
        assert!(log.contains(&steered), "{log}");
        assert_eq!(sockets(), cores, "one listening socket per lane");
        wait_for_lanes(&f.dir.socket(), cores);
    } else {
        assert_eq!(sockets(), 1, "{log}");
    }
    for i in 0..40u8 {
        let mut c = spliced.connect();
        let mut s = accept(&f.listener, ACCEPT);
        carry(&mut c, &mut s, &[i; 3]);
        carry(&mut s, &mut c, &[i; 5]);
    }
    if is_steered {
        // The program chose each connection's lane (a miss would leave it to the hash,
        // uncounted).
        let text = scrape(metrics_addr(&spliced));
        let steered = steered_total(&text, cores);
        assert_eq!(steered, 40, "{text}");
        let (code, out, err) = status(&["--socket", &f.dir.socket()], None);
        assert_eq!(code, Some(0), "{err}");
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("accepting on {cores} lanes: live ")))
            .unwrap_or_else(|| panic!("no lanes line in the status:\n{out}"));
        let steered: u64 = line
            .split("steered ")
            .nth(1)
            .unwrap_or_default()
            .split(' ')
            .map(|n| n.parse::<u64>().unwrap())
            .sum();
        assert_eq!(steered, 40, "{out}");
    }

    let taken = addr.to_string();
    let args = [
        "--listen",
        &taken,
        "--upstream",
        &f.upstream,
        "--mode",
        "copy",
    ];
    let Err(second) = Spliced::try_start(&args, 1) else {
        panic!("a second daemon listened on {taken} too");
    };
    assert!(
        second.log.contains("another process listens there"),
        "{}",
        second.log
    );

    f.dir.write("copy", "", &[("other", &f.upstream, "")]);
    hup(&spliced, "reload: configuration applied", 1);
    assert_eq!(sockets(), 0, "a removed route's sockets are all closed");
    assert_refused(addr);
}

/// Two routes on one port, on two of its addresses (127.0.0.1 and 127.0.0.2, both on loopback):
/// each listens with a socket per lane, a group each, and the program steers both (it tries the
/// port's groups in turn; the kernel takes only the SYN's own). Every connection is carried to
/// its own route and counted by the steering.
#[test]
fn two_routes_on_one_port_are_both_steered() {
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let f = Configured::new();
    let port = free_port();
    let routes = [("a", f.upstream.as_str(), ""), ("b", &f.upstream, "")];
    let config = f.dir.write("copy", METRICS, &routes);
    let text = fs::read_to_string(&config)
        .unwrap()
        .replacen(
            "listen = \"127.0.0.1:0",
            &format!("listen = \"127.0.0.1:{port}"),
            1,
        )
        .replacen(
            "listen = \"127.0.0.1:0",
            &format!("listen = \"127.0.0.2:{port}"),
            1,
        );
    fs::write(&config, text).unwrap();
    let spliced = Spliced::start_mode("copy", &["--config", &config], 2).unwrap();
    let log = accepting_lines(&spliced, &["a", "b"], cores);
    let steered = |name| format!("route {name}: accepting on {cores} lanes, each connection");
    let is_steered = cores > 1 && (steer_required() || log.contains(&steered("a")));
    let sockets = listening_sockets(spliced.pid())
        .into_iter()
        .filter(|p| *p == port)
        .count();
    if is_steered {
        assert!(
            log.contains(&steered("a")) && log.contains(&steered("b")),
            "{log}"
        );
        assert_eq!(
            sockets,
            2 * cores,
            "one listening socket per lane and route"
        );
        wait_for_lanes(&f.dir.socket(), cores);
    } else {
        assert_eq!(sockets, 2, "{log}");
    }
    for i in 0..40u8 {
        let ip = if i % 2 == 0 { "127.0.0.1" } else { "127.0.0.2" };
        let mut c = connect_to(SocketAddr::new(ip.parse().unwrap(), port));
        let mut s = accept(&f.listener, ACCEPT);
        carry(&mut c, &mut s, &[i; 3]);
        carry(&mut s, &mut c, &[i; 5]);
    }
    let text = scrape(metrics_addr(&spliced));
    for name in ["a", "b"] {
        let opened = metric(
            &text,
            &format!("spliced_connections_total{{route=\"{name}\"}}"),
        );
        assert_eq!(opened, 20, "route {name}: {text}");
    }
    if is_steered {
        let steered = steered_total(&text, cores);
        assert_eq!(
            steered, 40,
            "every connection steered, both routes': {text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// systemd: socket activation and readiness notifications.

/// The next datagram on the notify socket (at most 10 s).
fn next_notification(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    // A signal to the test process (a child's SIGCHLD) interrupts the wait: wait again, a
    // bounded number of times.
    for _ in 0..100 {
        match socket.recv(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => {
                let n = r.expect("a notification within 10 s");
                return String::from_utf8_lossy(&buf[..n]).into_owned();
            }
        }
    }
    panic!("the wait for a notification was interrupted 100 times");
}

fn socket_activation(mode: &str) {
    let f = Configured::new();
    let notify_path = f.dir.path.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The route's own listen address is on no interface here: binding it would fail, so a
    // working route proves the inherited socket is used.
    let config = f.dir.write(mode, "", &[("web", &f.upstream, "")]);
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace("127.0.0.1:0", "192.0.2.1:8080");
    fs::write(&config, text).unwrap();
    let (web_port, spare_port) = (free_port(), free_port());
    let mut daemon = Process::spawn(
        "systemd-socket-activate",
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
    let mut c = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || TcpStream::connect_timeout(&web, Duration::from_secs(5)).ok(),
        || format!("connect to {web}: {:?}", TcpStream::connect(web)),
    );
    set_timeouts(&c, Duration::from_secs(30));
    assert_eq!(
        next_notification(&notify),
        "READY=1\nSTATUS=forwarding 1 route(s)"
    );
    let log = daemon.wait_log("socket-activated", 1, LOG_WAIT);
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
    let mut s = accept(&f.listener, ACCEPT);
    carry(&mut c, &mut s, b"activated");
    carry(&mut s, &mut c, b"reply");

    // A reload adds route "spare": it takes the second inherited socket. systemd hears
    // RELOADING (with the monotonic time) and READY again.
    let text = fs::read_to_string(&config).unwrap()
        + &format!(
            "[[route]]\nname = \"spare\"\nlisten = \"192.0.2.1:8081\"\nupstream = \"{upstream}\"\n",
            upstream = f.upstream
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
    let mut s2 = accept(&f.listener, ACCEPT);
    carry(&mut c2, &mut s2, b"spare");
    // A failed reload is READY again too, with the reason.
    fs::write(&config, "bogus = 1\n").unwrap();
    daemon.signal(libc::SIGHUP);
    assert!(next_notification(&notify).starts_with("RELOADING=1"));
    assert_eq!(
        next_notification(&notify),
        "READY=1\nSTATUS=reload failed; running the previous configuration"
    );
    // The connection from before both reloads still works.
    carry(&mut c, &mut s, b"after");
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
    let dir = TempDir::new();
    let upstream = topo.upstream(9);
    let config = dir.write("copy", "", &[("web", &upstream, "")]);
    // A datagram socket is no TCP listener.
    let port = free_port();
    let mut daemon = Process::spawn(
        "systemd-socket-activate",
        Command::new("systemd-socket-activate")
            .arg("--datagram")
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg("--fdname=web")
            .arg("--setenv=RUST_LOG=info")
            .arg(spliced_bin())
            .args(["--config", &config]),
    );
    // A datagram starts the service.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let log = daemon.shared_log();
    let status = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let _ = udp.send_to(b"x", ("127.0.0.1", port));
            daemon.try_wait()
        },
        || format!("still running:\n{}", log.lock().unwrap()),
    );
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    daemon.wait_log(
        "socket activation: descriptor 3 (name \"web\"): not a TCP socket; spliced takes \
         ListenStream= sockets",
        1,
        LOG_WAIT,
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
        "ExecReload=+/bin/kill -HUP $MAINPID",
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
    let dir = TempDir::new();
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
    for task in tasks(pid) {
        let Ok(text) = fs::read_to_string(task.join("status")) else {
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
            task.file_name().unwrap().to_string_lossy().into_owned(),
            uids,
            hex("CapEff:"),
            hex("CapPrm:"),
            hex("CapBnd:"),
        ));
    }
    out
}

fn privilege_drop(mode: &str) {
    let f = Configured::new();
    // The socket's directory does not exist yet: spliced creates it and hands it over.
    let socket = f.dir.path.join("run/control.sock");
    // A small max_buffered makes sockmap hold and hand back (SO_RCVBUFFORCE) under a slow reader.
    let config = f.dir.write(
        mode,
        "metrics = \"127.0.0.1:0\"\nuser = \"nobody\"",
        &[(
            "web",
            &f.upstream,
            "max_buffered = \"64KiB\"\nidle_timeout = \"60s\"",
        )],
    );
    let text = fs::read_to_string(&config)
        .unwrap()
        .replace(&f.dir.socket(), socket.to_str().unwrap());
    fs::write(&config, &text).unwrap();
    // The sockmap data path logs at debug how many bytes it held and handed back.
    let env = [("RUST_LOG", Some("info,spliced::forward::sockmap=debug"))];
    let Some(mut spliced) = Spliced::start_mode_env(mode, &["--config", &config], &env, 1) else {
        return;
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
    let s = accept(&f.listener, ACCEPT);
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
            "[[route]]\nname = \"later\"\nlisten = \"127.0.0.1:{low}\"\nupstream = \"{upstream}\"\n",
            upstream = f.upstream
        );
    fs::write(&config, text).unwrap();
    hup(&spliced, "reload: configuration applied", 1);
    let mut c = connect_to(route_addr(&spliced, "later"));
    let mut s = accept(&f.listener, ACCEPT);
    carry(&mut c, &mut s, b"later");
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
