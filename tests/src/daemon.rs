//! [`Spliced`]: the real `spliced` binary started with given arguments, its log captured, stopped
//! on drop; and what the tests read from its log.
use std::{
    collections::HashMap,
    net::{SocketAddr, TcpStream},
    process::{Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use crate::{connect_to, ebpf_required, spliced_bin, wait_until, Process};

/// How long the helpers here wait for a log line.
pub const LOG_WAIT: Duration = Duration::from_secs(15);

/// A running spliced with its log.
pub struct Spliced {
    process: Process,
    /// The bound address of each route, in the order they were logged.
    pub listening: Vec<SocketAddr>,
}

/// Why a daemon did not come up.
#[derive(Debug)]
pub struct NotStarted {
    pub status: Option<ExitStatus>,
    pub log: String,
}

/// The addresses in the log's "listening on ADDR, ..." lines, in order.
fn listening(log: &str) -> Vec<SocketAddr> {
    log.lines()
        .filter_map(|l| l.split("listening on ").nth(1))
        .filter_map(|rest| rest.split(',').next()?.parse().ok())
        .collect()
}

impl Spliced {
    /// Starts `spliced ARGS` with `RUST_LOG` from `SPLICED_TEST_LOG` (default `info`) and waits
    /// (at most 20 s) until it has logged `routes` listeners.
    pub fn try_start(args: &[&str], routes: usize) -> Result<Spliced, NotStarted> {
        let log = std::env::var("SPLICED_TEST_LOG").unwrap_or("info".into());
        Self::try_start_env(args, &[("RUST_LOG", Some(&log))], routes)
    }

    /// Like [`Spliced::try_start`], but with the environment changed by `env`: `(name, Some(v))`
    /// sets a variable, `(name, None)` removes it. `RUST_LOG` is not set unless `env` sets it
    /// (the daemon's own default then applies). With `routes == 0` it returns as soon as the
    /// process is spawned, for log levels that hide the "listening on" lines.
    pub fn try_start_env(
        args: &[&str],
        env: &[(&str, Option<&str>)],
        routes: usize,
    ) -> Result<Spliced, NotStarted> {
        let mut cmd = Command::new(spliced_bin());
        cmd.args(args).env_remove("RUST_LOG");
        for (name, value) in env {
            match value {
                Some(v) => cmd.env(name, v),
                None => cmd.env_remove(name),
            };
        }
        Spliced::launch(&mut cmd, routes)
    }

    /// `spliced ARGS` inside network namespace `netns` (`ip netns exec` execs it, so the child
    /// is spliced itself), `RUST_LOG` as [`Spliced::try_start`] sets it.
    pub fn try_start_in_netns(
        netns: &str,
        args: &[&str],
        routes: usize,
    ) -> Result<Spliced, NotStarted> {
        let log = std::env::var("SPLICED_TEST_LOG").unwrap_or("info".into());
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(spliced_bin())
            .args(args)
            .env("RUST_LOG", log);
        Spliced::launch(&mut cmd, routes)
    }

    /// [`Spliced::start_mode`] inside network namespace `netns`.
    pub fn start_mode_in_netns(
        mode: &str,
        netns: &str,
        args: &[&str],
        routes: usize,
    ) -> Option<Spliced> {
        Self::start_mode_with(mode, Self::try_start_in_netns(netns, args, routes), args)
    }

    /// Spawns `cmd` and waits (at most [`start_limit`]) until it has logged `routes` listeners.
    fn launch(cmd: &mut Command, routes: usize) -> Result<Spliced, NotStarted> {
        let mut spliced = Spliced {
            process: Process::spawn("spliced", cmd),
            listening: Vec::new(),
        };
        let deadline = Instant::now() + start_limit();
        loop {
            spliced.listening = listening(&spliced.log());
            if spliced.listening.len() >= routes {
                return Ok(spliced);
            }
            if let Some(status) = spliced.process.try_wait() {
                thread::sleep(Duration::from_millis(100)); // let the readers finish
                return Err(NotStarted {
                    status: Some(status),
                    log: spliced.log(),
                });
            }
            if Instant::now() > deadline {
                return Err(NotStarted {
                    status: None,
                    log: spliced.log(),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts one route `--listen 127.0.0.1:0 --upstream UPSTREAM --mode MODE`. Returns None (the
    /// test is skipped, with a message) only when MODE is sockmap, eBPF is unavailable and not
    /// required; under `CI=true` that is a failure.
    pub fn route(mode: &str, upstream: &str, extra: &[&str]) -> Option<Spliced> {
        let mut args = route_args(mode, upstream);
        args.extend_from_slice(extra);
        Self::start_mode(mode, &args, 1)
    }

    /// Starts spliced with `args`, handling an unavailable sockmap path as [`Spliced::route`].
    pub fn start_mode(mode: &str, args: &[&str], routes: usize) -> Option<Spliced> {
        Self::start_mode_with(mode, Self::try_start(args, routes), args)
    }

    /// [`Spliced::start_mode`] with the environment changed as [`Spliced::try_start_env`] does.
    pub fn start_mode_env(
        mode: &str,
        args: &[&str],
        env: &[(&str, Option<&str>)],
        routes: usize,
    ) -> Option<Spliced> {
        Self::start_mode_with(mode, Self::try_start_env(args, env, routes), args)
    }

    fn start_mode_with(
        mode: &str,
        started: Result<Spliced, NotStarted>,
        args: &[&str],
    ) -> Option<Spliced> {
        match started {
            Ok(s) => Some(s),
            Err(e) if mode == "sockmap" && e.log.contains("mode sockmap cannot work here") => {
                assert!(
                    !ebpf_required(),
                    "the sockmap data path is required here (CI=true or SPLICED_REQUIRE_EBPF=1) \
                     but spliced could not use it:\n{}",
                    e.log
                );
                eprintln!("SKIPPED: sockmap unavailable on this machine:\n{}", e.log);
                None
            }
            Err(e) => panic!(
                "spliced {args:?} did not start ({:?}):\n{}",
                e.status, e.log
            ),
        }
    }

    /// The first route's address.
    pub fn addr(&self) -> SocketAddr {
        self.listening[0]
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Waits (at most `limit`) until the log has `count` lines containing `needle`.
    pub fn wait_log(&self, needle: &str, count: usize, limit: Duration) -> String {
        self.process.wait_log(needle, count, limit)
    }

    /// Connects a client to the first route (timeouts 60 s).
    pub fn connect(&self) -> TcpStream {
        connect_to(self.addr())
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// Sends `signal` (asserting that it was delivered).
    pub fn signal(&self, signal: i32) {
        self.process.signal(signal);
    }

    /// Sends `signal` (unless it has exited already) and waits (at most `limit`) for the exit
    /// status.
    pub fn signal_and_wait(&mut self, signal: i32, limit: Duration) -> ExitStatus {
        if self.process.try_wait().is_none() {
            self.process.signal(signal);
        }
        self.process.wait(limit)
    }

    /// Panics if the daemon has exited.
    pub fn assert_running(&mut self) {
        self.process.assert_running();
    }

    /// Waits (at most 20 s) until the daemon listens on exactly one port, and returns it: for
    /// log levels that hide the "listening on" lines.
    pub fn wait_listening_port(&mut self) -> u16 {
        let log = self.process.shared_log();
        let port = || {
            self.assert_running();
            let ports = crate::listening_ports(self.pid());
            assert!(ports.len() <= 1, "more than one listener: {ports:?}");
            ports.first().copied()
        };
        let failure = || {
            format!(
                "spliced does not listen after 20 s:\n{}",
                log.lock().unwrap()
            )
        };
        wait_until(
            Duration::from_secs(20),
            Duration::from_millis(20),
            port,
            failure,
        )
    }

    /// Asserts the daemon logs its `nth` (from 0) closed connection as complete with `up` bytes
    /// client to upstream and `down` back, and, when given, on data path `path`.
    pub fn assert_closed(&self, nth: usize, path: Option<&str>, up: u64, down: u64) {
        let log = self.wait_log("connection closed", nth + 1, LOG_WAIT);
        let line = closed_lines(&log)[nth];
        let want = match path {
            Some(path) => format!("path={path} bytes_up={up} bytes_down={down} "),
            None => format!("bytes_up={up} bytes_down={down} "),
        };
        assert!(line.contains(&want), "expected {want}: {line}");
        assert!(line.contains("end=complete"), "not complete: {line}");
    }
}

/// The command line of one route: `--listen 127.0.0.1:0 --upstream UPSTREAM --mode MODE`.
pub fn route_args<'a>(mode: &'a str, upstream: &'a str) -> Vec<&'a str> {
    vec![
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream,
        "--mode",
        mode,
    ]
}

/// The address route `name` last logged it listens on (waiting for the line at most 15 s).
pub fn route_addr(spliced: &Spliced, name: &str) -> SocketAddr {
    let needle = format!("route {name}: listening on ");
    let log = spliced.wait_log(&needle, 1, LOG_WAIT);
    let line = log.lines().rev().find(|l| l.contains(&needle)).unwrap();
    let rest = line.split(&needle).nth(1).unwrap();
    rest.split(',').next().unwrap().parse().unwrap()
}

/// Sends SIGHUP and waits for the `count`-th log line containing `outcome`.
pub fn hup(spliced: &Spliced, outcome: &str, count: usize) -> String {
    spliced.signal(libc::SIGHUP);
    spliced.wait_log(outcome, count, LOG_WAIT)
}

/// The log's "connection closed" lines.
pub fn closed_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("connection closed"))
        .collect()
}

/// The `key=value` fields of a "connection closed" line. `end` is the last field and its value
/// may contain spaces.
pub fn fields(line: &str) -> HashMap<&str, &str> {
    let rest = line
        .split_once("connection closed")
        .unwrap_or_else(|| panic!("not a connection closed line: {line}"))
        .1;
    let (head, end) = rest
        .split_once(" end=")
        .unwrap_or_else(|| panic!("no end= field: {line}"));
    let mut map: HashMap<&str, &str> = head
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    map.insert("end", end.trim_end());
    map
}

/// How long spliced may take to start listening: 20 s, or `SPLICED_TEST_START_SECS` (the arm64
/// VM guest, fully emulated under TCG, loads and verifies the eBPF program far slower).
fn start_limit() -> Duration {
    let secs = std::env::var("SPLICED_TEST_START_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(secs)
}
