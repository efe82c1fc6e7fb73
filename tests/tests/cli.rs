//! The `spliced` binary from the outside: its command line, `check`, its log and its life as a
//! daemon, run as root against the real kernel.
//!
//! - `check --config`: a valid file (link-local upstreams of a [`Topology`], interface zones)
//!   passes without binding anything; a file full of mistakes exits 64 and names each one with
//!   FILE:LINE:COLUMN, the key and what would be valid.
//! - Bad command lines exit 64 (EX_USAGE) with a message naming the problem; `--help` and
//!   `--version` exit 0.
//! - The per-connection "connection closed" line carries the route, both addresses, the data
//!   path, the byte counts of what was really sent, the duration and how it ended.
//! - `RUST_LOG` filters the log, including the eBPF program's aya-log records.
//! - SIGTERM and SIGINT: stop accepting at once, let live connections run for the grace period,
//!   then reset them and exit 0.
//! - Startup names the data path each route uses; two routes forward to their own upstreams; a
//!   storm of resetting and silent clients does not disturb a bulk transfer.
//!
//! Traffic goes only to loopback and to the test's own namespaces. Every socket has timeouts,
//! every wait and loop is bounded, every child process is waited for or killed.
use std::{
    io::{self, Read},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use tests::{
    accept, assert_closed_on_connect, assert_no_connection, assert_refused, bytes, closed_lines,
    closed_within, ebpf_required, exchange, fields, half_close_exchange, per_mode, read_retrying,
    route_addr, route_args, run, set_linger_zero, set_timeouts, wait_until, Configured, Payload,
    Spliced, TempConfig, Topology, BLOCK, MODES,
};

const ACCEPT: Duration = Duration::from_secs(10);
const LOG_WAIT: Duration = Duration::from_secs(10);
/// The aya-log record of the verdict program for a FIN.
const FIN_RECORD: &str = "zero-length skb (FIN) dropped";

// ---------------------------------------------------------------------------------------------
// 1, 2: spliced check.

#[test]
fn check_accepts_a_valid_file_without_binding() {
    let topo = Topology::new();
    // The first route's listen address is taken: check must not try to bind it.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap();
    let host_if = &topo.host_if;
    let text = format!(
        r#"# a file with every key
mode = "copy"
grace_period = "2s"
send_buffer = "4MiB"
max_connections = 100

[[route]]
name = "ghost"
listen = "{busy_addr}"
upstream = "{upstream}"
interface = "{host_if}"
connect_timeout = "250ms"

[[route]]
name = "web.v2"
listen = "[::1]:0"
upstream = "[fe80::2%{index}]:80"
mode = "splice"
"#,
        upstream = topo.upstream(2368),
        index = topo.host_if_index(),
    );
    let config = TempConfig::new(&text);
    let out = run(&["check", "--config", config.path()]);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, format!("{}: ok, 2 route(s)\n", config.path()));
    assert_eq!(out.stderr, "", "check printed warnings");

    // The zone and `interface` are checked against the machine: without the interface, the
    // same file is refused at both places.
    topo.delete_veth();
    let out = run(&["check", "--config", config.path()]);
    assert_eq!(out.code, Some(64), "stdout: {}", out.stdout);
    let lines: Vec<&str> = out.stderr.lines().collect();
    let missing = format!("interface \"{host_if}\"");
    assert_eq!(lines.len(), 2, "{}", out.stderr);
    let path = config.path();
    let expected = [
        format!("error: {path}:10:12: route[0].upstream: {missing} (the zone of"),
        format!("error: {path}:11:13: route[0].interface: {missing} does not exist"),
    ];
    for (line, prefix) in lines.iter().zip(&expected) {
        assert!(line.starts_with(prefix), "{line}");
    }
    drop(busy);
}

#[test]
fn check_reports_every_error_with_its_position() {
    let lines = [
        /* 1 */ "# one mistake per line",
        /* 2 */ r#"grace_period = "5 s""#,
        /* 3 */ r#"send_bufer = "1MiB""#,
        /* 4 */ "max_connections = 0",
        /* 5 */ "",
        /* 6 */ "[[route]]",
        /* 7 */ r#"name = "web""#,
        /* 8 */ r#"listen = "127.0.0.1:notaport""#,
        /* 9 */ r#"upstream = "[fe80::2%nosuchif9]:80""#,
        /* 10 */ r#"connect_timeout = "0s""#,
        /* 11 */ r#"mode = "fast""#,
        /* 12 */ "",
        /* 13 */ "[[route]]",
        /* 14 */ r#"name = "web""#,
        /* 15 */ r#"listen = "127.0.0.1:0""#,
        /* 16 */ r#"upstream = "fe80::1:80""#,
        /* 17 */ r#"interface = "nosuchif8""#,
        /* 18 */ r#"timeout = "1s""#,
    ];
    let config = TempConfig::new(&(lines.join("\n") + "\n"));
    // (line, column, key, what the message must say: the problem and what would be valid)
    let expected: [(u32, u32, &str, &[&str]); 11] = [
        (
            2,
            16,
            "grace_period",
            &[r#""5 s" is not a duration"#, r#"e.g. "5s" or "250ms""#],
        ),
        (
            3,
            1,
            "send_bufer",
            &[
                "unknown key",
                "did you mean `send_buffer`?",
                "valid top-level keys are `mode`",
            ],
        ),
        (
            4,
            19,
            "max_connections",
            &["0 is out of range", "use 1 to 100000000"],
        ),
        (
            8,
            10,
            "route[0].listen",
            &[
                r#""127.0.0.1:notaport""#,
                r#"port "notaport" is not a number"#,
                "1 to 65535",
            ],
        ),
        (
            9,
            12,
            "route[0].upstream",
            &[r#"interface "nosuchif9""#, "does not exist on this machine"],
        ),
        (
            10,
            19,
            "route[0].connect_timeout",
            &["must be more than 0", r#"e.g. "5s""#],
        ),
        (
            11,
            8,
            "route[0].mode",
            &[
                r#""fast" is not a mode"#,
                "use one of auto, sockmap, splice, copy",
            ],
        ),
        (
            14,
            8,
            "route[1].name",
            &[r#""web" is already the name of route[0]"#, "must be unique"],
        ),
        (
            16,
            12,
            "route[1].upstream",
            &["an IPv6 address needs brackets", r#"write "[fe80::1]:80""#],
        ),
        (
            17,
            13,
            "route[1].interface",
            &[r#"interface "nosuchif8" does not exist"#],
        ),
        (
            18,
            1,
            "route[1].timeout",
            &[
                "unknown key",
                "valid [[route]] keys are",
                "`connect_timeout`",
            ],
        ),
    ];
    let out = run(&["check", "--config", config.path()]);
    assert_eq!(out.code, Some(64), "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "", "nothing on stdout for a bad file");
    let got: Vec<&str> = out.stderr.lines().collect();
    for (line, col, key, says) in expected {
        let prefix = format!("error: {}:{line}:{col}: {key}: ", config.path());
        let found = got
            .iter()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no error starting with {prefix:?} in:\n{}", out.stderr));
        for s in says {
            assert!(found.contains(s), "{found:?} does not say {s:?}");
        }
    }
    assert_eq!(
        got.len(),
        expected.len(),
        "exactly one line per error:\n{}",
        out.stderr
    );
    let positions: Vec<(u32, u32)> = expected.iter().map(|e| (e.0, e.1)).collect();
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(positions, sorted, "the expectations are in file order");
    for (l, e) in got.iter().zip(&expected) {
        let prefix = format!("error: {}:{}:{}: {}: ", config.path(), e.0, e.1, e.2);
        assert!(l.starts_with(&prefix), "errors in file order: {l:?}");
    }

    // A TOML syntax error is reported alone, with its position.
    let config = TempConfig::new("mode = \"copy\"\nx = \n");
    let out = run(&["check", "--config", config.path()]);
    assert_eq!(out.code, Some(64));
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(
        out.stderr
            .starts_with(&format!("error: {}:2:5: invalid TOML: ", config.path())),
        "{}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// 3: bad command lines.

#[test]
fn bad_command_lines_exit_64_and_name_the_problem() {
    let config = TempConfig::new(
        "[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n",
    );
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--listen", "127.0.0.1:0"],
            &["required arguments were not provided", "--upstream <ADDR>"],
        ),
        (
            &["--upstream", "127.0.0.1:1"],
            &["required arguments were not provided", "--listen <ADDR>"],
        ),
        (
            &[
                "--config",
                config.path(),
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "127.0.0.1:1",
            ],
            &["cannot be used with", "--listen <ADDR>", "--config <FILE>"],
        ),
        (
            &["--listen", "127.0.0.1:0", "--config", config.path()],
            &["'--listen <ADDR>' cannot be used with '--config <FILE>'"],
        ),
        (
            &["--listen", "127.0.0.1", "--upstream", "127.0.0.1:1"],
            &[
                r#"--listen: "127.0.0.1": missing port"#,
                r#""127.0.0.1:PORT""#,
            ],
        ),
        (
            &["--listen", "127.0.0.1:0", "--upstream", "fe80::1:80"],
            &[
                r#"--upstream: "fe80::1:80": an IPv6 address needs brackets"#,
                r#""[fe80::1]:80""#,
            ],
        ),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "[fe80::1%nosuchif7]:80",
            ],
            &[r#"--upstream: interface "nosuchif7""#, "does not exist"],
        ),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "127.0.0.1:1",
                "--mode",
                "fast",
            ],
            &[
                "invalid value 'fast' for '--mode <MODE>'",
                "possible values: auto, sockmap, splice, copy",
            ],
        ),
        (&[], &["required arguments were not provided", "--config"]),
        (&["check"], &["required arguments", "--config <FILE>"]),
        (&["bogus"], &["unrecognized subcommand 'bogus'"]),
        (
            &["check", "--config", "/nonexistent/spliced.toml"],
            &["/nonexistent/spliced.toml: cannot read the configuration file"],
        ),
        (
            &["--config", "/nonexistent/spliced.toml"],
            &["/nonexistent/spliced.toml: cannot read the configuration file"],
        ),
    ];
    let mut wrong = Vec::new();
    for (args, says) in cases {
        let out = run(args);
        if out.code != Some(64) {
            wrong.push(format!("{args:?}: exit {:?}, expected 64", out.code));
        }
        for s in *says {
            if !out.stderr.contains(s) {
                wrong.push(format!(
                    "{args:?}: stderr does not say {s:?}:\n{}",
                    out.stderr
                ));
            }
        }
        if out.stderr.contains("listening on") {
            wrong.push(format!("{args:?}: a daemon started:\n{}", out.stderr));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    let help = run(&["--help"]);
    assert_eq!(help.code, Some(0), "{}", help.stderr);
    assert!(help
        .stdout
        .contains("Usage: spliced --listen <ADDR> --upstream <ADDR>"));
    assert!(
        help.stdout.contains("exits with status 64"),
        "{}",
        help.stdout
    );
    let version = run(&["--version"]);
    assert_eq!(version.code, Some(0), "{}", version.stderr);
    assert!(version.stdout.starts_with("spliced "), "{}", version.stdout);
}

// ---------------------------------------------------------------------------------------------
// 4: the per-connection log line.

fn connection_log_line(mode: &str) {
    let topo = Topology::new();
    let (listener, upstream) = topo.upstream_listener();
    let Some(spliced) = Spliced::route(mode, &upstream, &[]) else {
        return;
    };
    let mut c = spliced.connect();
    let client = c.local_addr().unwrap();
    let mut s = accept(&listener, ACCEPT);
    let up = bytes(1234, 1);
    let down = bytes(100_000, 2);
    // A round trip (on the route's path before any FIN), then a connection of at least 300 ms.
    exchange(&mut c, &mut s, b"hello", b"hi");
    thread::sleep(Duration::from_millis(300));
    half_close_exchange(&mut c, &mut s, &up, &down);
    drop((c, s));
    spliced.wait_log("connection closed", 1, LOG_WAIT);
    thread::sleep(Duration::from_millis(200)); // a second line would show now
    let log = spliced.log();
    let lines = closed_lines(&log);
    assert_eq!(lines.len(), 1, "exactly one line per connection:\n{log}");
    let line = lines[0];
    assert!(
        line.contains(" INFO "),
        "a complete connection is info: {line}"
    );
    let f = fields(line);
    let port = listener.local_addr().unwrap().port();
    let upstream = format!("[fe80::2%{}]:{port}", topo.host_if_index());
    let expected = [
        ("route", "cli"),
        ("client", &client.to_string()),
        ("upstream", &upstream),
        ("path", mode),
        ("bytes_up", &(5 + up.len()).to_string()),
        ("bytes_down", &(2 + down.len()).to_string()),
        ("end", "complete"),
    ];
    for (key, value) in expected {
        assert_eq!(f.get(key).copied(), Some(value), "{key} in {line}");
    }
    let ms: u64 = f["duration_ms"].parse().expect("duration_ms is a number");
    assert!((300..30_000).contains(&ms), "duration_ms={ms}: {line}");
    assert_eq!(f.len(), 8, "no other fields: {line}");
}
per_mode!(connection_log_line, super::connection_log_line);

// ---------------------------------------------------------------------------------------------
// 5: RUST_LOG.

#[test]
fn rust_log_debug_shows_the_ebpf_fin_record() {
    let topo = Topology::new();
    let (listener, upstream) = topo.upstream_listener();
    let args = route_args("sockmap", &upstream);
    let env = [("RUST_LOG", Some("debug"))];
    let Some(spliced) = Spliced::start_mode_env("sockmap", &args, &env, 1) else {
        return;
    };
    let before = spliced.log().matches(FIN_RECORD).count();
    let mut c = spliced.connect();
    let mut s = accept(&listener, ACCEPT);
    // A round trip first: a FIN that arrives before the daemon inserted the sockets makes it
    // decline sockmap (the socket is no longer ESTABLISHED) and use splice.
    exchange(&mut c, &mut s, b"hello", b"hi");
    // Two FINs: the client's, then the upstream's.
    half_close_exchange(&mut c, &mut s, b"request", b"reply");
    let log = spliced.wait_log(FIN_RECORD, before + 2, LOG_WAIT);
    for line in log.lines().filter(|l| l.contains(FIN_RECORD)) {
        assert!(
            line.contains("DEBUG") && line.contains("proxy_ebpf"),
            "the record comes from the eBPF program at debug: {line}"
        );
    }
    let log = spliced.wait_log("connection closed", 1, LOG_WAIT);
    let f = fields(closed_lines(&log)[0]);
    assert_eq!((f["path"], f["end"]), ("sockmap", "complete"));
}

#[test]
fn without_rust_log_the_daemon_logs_at_info() {
    let topo = Topology::new();
    let (listener, upstream) = topo.upstream_listener();
    let args = route_args("sockmap", &upstream);
    let Some(spliced) = Spliced::start_mode_env("sockmap", &args, &[("RUST_LOG", None)], 1) else {
        return;
    };
    let mut c = spliced.connect();
    let mut s = accept(&listener, ACCEPT);
    exchange(&mut c, &mut s, b"hello", b"hi"); // on the sockmap path before the FINs
    half_close_exchange(&mut c, &mut s, b"request", b"reply");
    let log = spliced.wait_log("connection closed", 1, LOG_WAIT);
    let f = fields(closed_lines(&log)[0]);
    assert_eq!((f["path"], f["end"]), ("sockmap", "complete"));
    thread::sleep(Duration::from_millis(300)); // let late records arrive
    let log = spliced.log();
    assert!(log.contains(" INFO "), "info lines are shown:\n{log}");
    assert!(
        !log.contains(FIN_RECORD),
        "debug records are hidden:\n{log}"
    );
    assert!(!log.contains("DEBUG"), "debug lines are hidden:\n{log}");
}

#[test]
fn rust_log_warn_hides_info_lines() {
    let topo = Topology::new();
    let (listener, upstream) = topo.upstream_listener();
    let args = route_args("copy", &upstream);
    // No "listening on" line at warn: find the port from /proc.
    let mut spliced = Spliced::try_start_env(&args, &[("RUST_LOG", Some("warn"))], 0)
        .unwrap_or_else(|e| panic!("spliced did not start ({:?}):\n{}", e.status, e.log));
    let addr: SocketAddr = ([127, 0, 0, 1], spliced.wait_listening_port()).into();
    // A complete connection (an info line, hidden)...
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}\n{}", spliced.log()));
    set_timeouts(&c, Duration::from_secs(10));
    let mut s = accept(&listener, ACCEPT);
    half_close_exchange(&mut c, &mut s, b"request", b"reply");
    drop((c, s));
    // ...then one whose upstream cannot be reached (a warning, shown): the zone's interface is
    // gone. (Not a closed listener: a child spawned by another test at that moment could still
    // hold it open.) The daemon resets the client, which may come before connect() returns.
    topo.delete_veth();
    assert_closed_on_connect(addr, Duration::from_secs(10));
    spliced.wait_log("upstream failed", 1, LOG_WAIT);
    let status = spliced.signal_and_wait(libc::SIGTERM, Duration::from_secs(5));
    assert!(status.success(), "{status}");
    thread::sleep(Duration::from_millis(100)); // let the log readers finish
    let log = spliced.log();
    let warning = log.lines().find(|l| l.contains("upstream failed")).unwrap();
    assert!(warning.contains(" WARN "), "{warning}");
    assert!(
        warning.contains(&topo.host_if),
        "names the interface: {warning}"
    );
    for hidden in [
        " INFO ",
        "listening on",
        "connection closed",
        "SIGTERM: stopping",
    ] {
        assert!(!log.contains(hidden), "{hidden:?} is shown at warn:\n{log}");
    }
}

// ---------------------------------------------------------------------------------------------
// 6: signals.

fn sigterm_without_connections(mode: &str) {
    let topo = Topology::new();
    let (_listener, upstream) = topo.upstream_listener();
    let Some(mut spliced) = Spliced::route(mode, &upstream, &[]) else {
        return;
    };
    let addr = spliced.addr();
    let t = Instant::now();
    let status = spliced.signal_and_wait(libc::SIGTERM, Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
    assert!(t.elapsed() < Duration::from_secs(5));
    let log = spliced.log();
    assert!(log.contains("SIGTERM: stopping"), "{log}");
    assert!(!log.contains("live connection"), "{log}");
    assert_refused(addr);
}
per_mode!(
    sigterm_without_connections,
    super::sigterm_without_connections
);

/// A live, idle connection through a daemon with a 1 s grace period, then `signal`: the daemon
/// stops accepting at once, the connection works during the grace, is closed after it, and the
/// daemon exits 0 within grace + 3 s.
fn graceful_stop(mode: &str, signal: i32, name: &str) {
    let f = Configured::new();
    let Some(mut spliced) = f.start_route(mode, "grace_period = \"1s\"", "graceful", "") else {
        return;
    };
    let addr = spliced.addr();
    let mut c = spliced.connect();
    let mut s = accept(&f.listener, ACCEPT);
    exchange(&mut c, &mut s, b"before", b"ok before");
    thread::sleep(Duration::from_millis(100)); // idle

    let t0 = Instant::now();
    spliced.signal(signal);
    let log = spliced.wait_log("stopped accepting", 1, Duration::from_secs(2));
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "stopping took {:?}",
        t0.elapsed()
    );
    assert!(log.contains(&format!("{name}: stopping")), "{log}");
    assert!(
        log.contains("stopped accepting; waiting up to 1s for 1 live connection(s)"),
        "{log}"
    );
    assert_refused(addr);
    // The live connection still works during the grace period.
    exchange(&mut c, &mut s, b"during grace", b"ok during grace");
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "the exchange ran past the grace period: {:?}",
        t0.elapsed()
    );
    spliced.assert_running();
    // After the grace, both ends are closed.
    closed_within(&mut c, Duration::from_secs(3));
    let closed_at = t0.elapsed();
    closed_within(&mut s, Duration::from_secs(3));
    assert!(
        closed_at >= Duration::from_millis(900),
        "closed after {closed_at:?}, before the 1 s grace period was over"
    );
    let status = spliced.signal_and_wait(0, Duration::from_secs(4).saturating_sub(t0.elapsed()));
    assert!(status.success(), "exit status {status}");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "exit after {:?}",
        t0.elapsed()
    );
    thread::sleep(Duration::from_millis(100)); // let the log readers finish
    let log = spliced.log();
    assert!(
        log.contains("grace period of 1s over: resetting 1 connection(s)"),
        "{log}"
    );
    let lines = closed_lines(&log);
    assert_eq!(lines.len(), 1, "{log}");
    let f = fields(lines[0]);
    let up = "before".len() + "during grace".len();
    let down = "ok before".len() + "ok during grace".len();
    assert_eq!(f["route"], "graceful", "{}", lines[0]);
    assert_eq!(f["path"], mode, "{}", lines[0]);
    assert_eq!(f["bytes_up"], up.to_string(), "{}", lines[0]);
    assert_eq!(f["bytes_down"], down.to_string(), "{}", lines[0]);
    assert_eq!(
        f["end"], "closed at shutdown after the grace period",
        "{}",
        lines[0]
    );
}

fn sigterm_with_a_live_connection(mode: &str) {
    graceful_stop(mode, libc::SIGTERM, "SIGTERM");
}
per_mode!(
    sigterm_with_a_live_connection,
    super::sigterm_with_a_live_connection
);

#[test]
fn sigint_with_a_live_connection() {
    graceful_stop("copy", libc::SIGINT, "SIGINT");
}

/// With a long grace period, the daemon exits as soon as its last connection ends.
fn stop_ends_with_the_last_connection(mode: &str) {
    let f = Configured::new();
    let Some(mut spliced) = f.start_route(mode, "grace_period = \"30s\"", "r", "") else {
        return;
    };
    let mut c = spliced.connect();
    let mut s = accept(&f.listener, ACCEPT);
    exchange(&mut c, &mut s, b"hello", b"hi");
    spliced.signal(libc::SIGTERM);
    spliced.wait_log("stopped accepting", 1, Duration::from_secs(2));
    let t = Instant::now();
    half_close_exchange(&mut c, &mut s, b"last words", b"bye");
    let status = spliced.signal_and_wait(0, Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
    assert!(t.elapsed() < Duration::from_secs(5), "not the 30 s grace");
    let log = spliced.log();
    assert!(!log.contains("grace period of"), "{log}");
    let f = fields(closed_lines(&log)[0]);
    assert_eq!((f["bytes_up"], f["bytes_down"]), ("15", "5"));
    assert_eq!(f["end"], "complete");
}
per_mode!(
    stop_ends_with_the_last_connection,
    super::stop_ends_with_the_last_connection
);

// ---------------------------------------------------------------------------------------------
// 7: which data path.

#[test]
fn startup_log_names_the_data_path() {
    let topo = Topology::new();
    let (listener, upstream) = topo.upstream_listener();
    let probe = "data path sockmap: verdict program loaded, probe passed";
    let mut have_sockmap = false;
    for mode in MODES {
        let Some(spliced) = Spliced::route(mode, &upstream, &[]) else {
            continue;
        };
        have_sockmap |= mode == "sockmap";
        let log = spliced.log();
        let route = log
            .lines()
            .find(|l| l.contains("route cli: listening on"))
            .expect("route line");
        assert!(
            route.ends_with(&format!("upstream {upstream}, data path {mode}")),
            "{route}"
        );
        assert_eq!(
            log.contains(probe),
            mode == "sockmap",
            "the program is loaded only when a route may use it:\n{log}"
        );
    }
    assert!(have_sockmap || !ebpf_required());
    let Some(spliced) = Spliced::route("auto", &upstream, &[]) else {
        unreachable!("auto always starts")
    };
    let log = spliced.log();
    let chosen = if have_sockmap { "sockmap" } else { "splice" };
    let route = log
        .lines()
        .find(|l| l.contains("route cli: listening on"))
        .expect("route line");
    assert!(route.ends_with(&format!("data path {chosen}")), "{route}");
    if have_sockmap {
        assert!(log.contains(probe), "{log}");
    } else {
        assert!(
            log.contains("sockmap unavailable, auto routes use splice(2)"),
            "{log}"
        );
    }
    // The connection really takes that path: with sockmap, `auto` starts on the copy path and
    // moves a connection on after 256 KiB, 32 turns of the talk or 100 ms (datapath.rs tests the
    // move); a short
    // exchange like this one ends before, unless the machine is so slow (a TCG guest) that it
    // lived past 100 ms: then it may have moved on (to sockmap, or to splice where sockmap
    // declined it), or not (the timer starts after the dial, and a FIN first keeps it on copy).
    let mut c = spliced.connect();
    let mut s = accept(&listener, ACCEPT);
    exchange(&mut c, &mut s, b"hello", b"hi"); // on its path before the FINs
    half_close_exchange(&mut c, &mut s, b"auto", b"chosen");
    let log = spliced.wait_log("connection closed", 1, LOG_WAIT);
    let f = fields(closed_lines(&log)[0]);
    assert_eq!(f["end"], "complete");
    let lived: u64 = f["duration_ms"].parse().unwrap();
    let expected: &[&str] = match (have_sockmap, lived < 100) {
        (false, _) => &["splice"],
        (true, true) => &["copy"],
        (true, false) => &["copy", "sockmap", "splice"],
    };
    assert!(expected.contains(&f["path"]), "lived {lived} ms: {log}");
}

// ---------------------------------------------------------------------------------------------
// 8: two routes.

#[test]
fn two_routes_forward_to_their_own_upstreams() {
    let (ta, tb) = (Topology::new(), Topology::new());
    let (la, lb) = (ta.listen(), tb.listen());
    let config = TempConfig::new(&format!(
        "grace_period = \"0s\"\n\n\
         [[route]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\n\
         [[route]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"copy\"\n",
        ta.upstream(la.local_addr().unwrap().port()),
        tb.upstream(lb.local_addr().unwrap().port()),
    ));
    let spliced = Spliced::try_start(&["--config", config.path()], 2)
        .unwrap_or_else(|e| panic!("spliced did not start ({:?}):\n{}", e.status, e.log));
    let (addr_a, addr_b) = (route_addr(&spliced, "a"), route_addr(&spliced, "b"));
    let log = spliced.log();
    assert_ne!(addr_a, addr_b);
    assert!(log.contains("data path copy"), "route b's own mode:\n{log}");
    for (addr, mine, other, seed) in [(addr_a, &la, &lb, 1u64), (addr_b, &lb, &la, 2)] {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        set_timeouts(&c, Duration::from_secs(10));
        let mut s = accept(mine, ACCEPT);
        let (up, down) = (bytes(1000 + seed, seed), bytes(2000, seed + 10));
        half_close_exchange(&mut c, &mut s, &up, &down);
        assert_no_connection(other, "the other route's upstream got a connection");
    }
    let log = spliced.wait_log("connection closed", 2, LOG_WAIT);
    let mut by_route: Vec<(String, String)> = closed_lines(&log)
        .into_iter()
        .map(|l| {
            let f = fields(l);
            (f["route"].to_owned(), f["bytes_up"].to_owned())
        })
        .collect();
    by_route.sort();
    assert_eq!(
        by_route,
        [
            ("a".to_owned(), "1001".to_owned()),
            ("b".to_owned(), "1002".to_owned())
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// 9: hostile clients.

const BULK: u64 = 64 << 20;
const HOSTILE: usize = 100;

fn hostile_clients_do_not_disturb(mode: &str) {
    let topo = Topology::new();
    let (listener, upstream) = topo.upstream_listener();
    let Some(mut spliced) = Spliced::route(mode, &upstream, &[]) else {
        return;
    };
    let addr = spliced.addr();
    let mut client = spliced.connect();
    let mut bulk_server = accept(&listener, ACCEPT);

    // The upstream closes every other connection at once (the hostile ones).
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let stop = stop.clone();
        thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut accepted = 0usize;
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((s, _)) => {
                        accepted += 1;
                        drop(s);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => panic!("upstream accept: {e}"),
                }
            }
            (listener, accepted)
        })
    };

    // The receiver reads slowly while the storm lasts, and waits for its end half way, so
    // the transfer is in flight during the whole storm.
    let storm_over = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let receiver = {
        let (storm_over, received) = (storm_over.clone(), received.clone());
        thread::spawn(move || {
            let started = Instant::now();
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; BLOCK];
            let mut total = 0u64;
            loop {
                let n = read_retrying(&mut bulk_server, &mut buf).expect("bulk read");
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                total += n as u64;
                received.store(total, Ordering::SeqCst);
                let storming = || {
                    !storm_over.load(Ordering::SeqCst)
                        && started.elapsed() < Duration::from_secs(50)
                };
                if storming() {
                    thread::sleep(Duration::from_millis(1));
                }
                while total >= BULK / 2 && storming() {
                    thread::sleep(Duration::from_millis(5));
                }
            }
            bulk_server.shutdown(Shutdown::Write).unwrap();
            (total, <[u8; 32]>::from(hash.finalize()))
        })
    };
    let sender = thread::spawn(move || {
        let sent = Payload::new(BULK, 9).send(&mut client).expect("bulk send");
        client.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).expect("EOF after the bulk");
        assert!(rest.is_empty());
        sent
    });

    // Wait until the transfer runs, then the storm.
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(5),
        || (received.load(Ordering::SeqCst) >= 1 << 20).then_some(()),
        || "the bulk transfer does not start".into(),
    );
    let connect = || {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("hostile connect");
        set_timeouts(&s, Duration::from_secs(5));
        s
    };
    for _ in 0..HOSTILE {
        let rst = connect();
        set_linger_zero(&rst);
        drop(rst); // RST
        drop(connect()); // FIN without a byte
    }
    let at_storm_end = received.load(Ordering::SeqCst);
    storm_over.store(true, Ordering::SeqCst);
    assert!(
        at_storm_end < BULK,
        "the transfer was over before the storm ended"
    );

    let sent = sender.join().expect("sender");
    let (n, hash) = receiver.join().expect("receiver");
    assert_eq!(n, BULK, "bytes received");
    assert_eq!(hash, sent, "SHA-256 differs");
    spliced.assert_running();

    // Every connection ends and is logged; the bulk one complete.
    let log = spliced.wait_log(
        "connection closed",
        2 * HOSTILE + 1,
        Duration::from_secs(30),
    );
    assert!(!log.contains("upstream failed"), "{log}");
    let bulk: Vec<_> = closed_lines(&log)
        .into_iter()
        .map(fields)
        .filter(|f| f["bytes_up"] == BULK.to_string())
        .collect();
    assert_eq!(bulk.len(), 1, "one bulk line:\n{log}");
    assert_eq!((bulk[0]["path"], bulk[0]["end"]), (mode, "complete"));

    // And the daemon still serves.
    stop.store(true, Ordering::SeqCst);
    let (listener, accepted) = acceptor.join().expect("acceptor");
    assert_eq!(
        accepted,
        2 * HOSTILE,
        "upstream connections of the hostile clients"
    );
    let mut c = spliced.connect();
    let mut s = accept(&listener, ACCEPT);
    half_close_exchange(&mut c, &mut s, b"still there?", b"yes");
    spliced.assert_running();
}
per_mode!(
    hostile_clients_do_not_disturb,
    super::hostile_clients_do_not_disturb
);
