//! spliced's integration-test harness: real kernel, real sockets, real network namespaces.
//!
//! - [`Topology`]: a network namespace of its own joined to the host by a veth pair, with
//!   link-local addresses only (`fe80::1` on the host side, `fe80::2` inside), removed on drop,
//!   also when the test panics. Names are unique per process and counter (`spl-<pid>-<n>`), so
//!   tests run in parallel; `cargo xtask test` removes those left by a killed run.
//! - [`Spliced`]: the real `spliced` binary (`SPLICED_BIN`, set by `cargo xtask test`), started
//!   with given arguments, its log captured, stopped on drop.
//! - [`Payload`]: a deterministic byte stream and its SHA-256, for comparing both ends.
//!
//! Every wait is bounded: sockets get read/write timeouts, polls have a deadline.
use std::{
    fs::File,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

/// The data paths the suite runs against.
pub const MODES: [&str; 3] = ["sockmap", "splice", "copy"];

/// `default` bytes, or `SPLICED_TEST_BULK_MIB` MiB when that is set: `cargo xtask
/// integration-test vm` scales bulk transfers down, QEMU without KVM being far slower.
pub fn bulk_bytes(default: u64) -> u64 {
    match std::env::var("SPLICED_TEST_BULK_MIB") {
        Ok(v) => {
            let mib: u64 = v
                .parse()
                .unwrap_or_else(|_| panic!("SPLICED_TEST_BULK_MIB={v:?} is not a number"));
            mib << 20
        }
        Err(_) => default,
    }
}

/// Runs `cmd`, panicking with its stderr unless it succeeds.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace `spl-<pid>-<n>` joined to the host by veth `sp<pid>h<n>` (host side, `fe80::1`)
/// and `eth0` (inside, `fe80::2`), plus `10.213.x.y/30` IPv4 addresses for IPv4 tests.
pub struct Topology {
    pub netns: String,
    /// The host side of the veth pair: the zone of `fe80::2`.
    pub host_if: String,
    pub n: u32,
}

impl Topology {
    pub fn new() -> Topology {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let topo = Topology {
            netns: format!("spl-{pid}-{n}"),
            host_if: format!("sp{}h{n}", pid % 10_000_000),
            n,
        };
        sh(&["ip", "netns", "add", &topo.netns]);
        // From here on, drop removes what exists.
        topo.add_veth();
        sh(&["ip", "-n", &topo.netns, "link", "set", "lo", "up"]);
        topo
    }

    /// Creates (or re-creates) the veth pair with its addresses.
    pub fn add_veth(&self) {
        let (ns, h) = (&self.netns, &self.host_if);
        let (a, b) = self.ipv4();
        sh(&[
            "ip", "link", "add", h, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        sh(&["ip", "addr", "add", "fe80::1/64", "dev", h, "nodad"]);
        sh(&["ip", "addr", "add", &format!("{a}/30"), "dev", h]);
        sh(&["ip", "link", "set", h, "up"]);
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            "fe80::2/64",
            "dev",
            "eth0",
            "nodad",
        ]);
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{b}/30"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
    }

    /// Deletes the veth pair (both ends).
    pub fn delete_veth(&self) {
        sh(&["ip", "link", "delete", &self.host_if]);
    }

    /// (host side, namespace side) IPv4 addresses of this topology's /30.
    pub fn ipv4(&self) -> (String, String) {
        let base = (self.n % 16_384) * 4;
        let (third, fourth) = (base / 256, base % 256);
        (
            format!("10.213.{third}.{}", fourth + 1),
            format!("10.213.{third}.{}", fourth + 2),
        )
    }

    /// The interface index of the host side (for `%index` zones).
    pub fn host_if_index(&self) -> u32 {
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", self.host_if))
            .expect("host veth exists")
            .trim()
            .parse()
            .expect("ifindex is a number")
    }

    /// `[fe80::2%<host_if>]:port`: how the host reaches a server in the namespace.
    pub fn upstream(&self, port: u16) -> String {
        format!("[fe80::2%{}]:{port}", self.host_if)
    }

    /// Runs `f` on a thread that has joined the namespace; sockets created there stay in the
    /// namespace when handed back.
    pub fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.netns);
        thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread panicked")
    }

    /// A listener on `[::]:0` inside the namespace (reachable at `fe80::2` and the IPv4 address).
    pub fn listen(&self) -> TcpListener {
        self.in_netns(|| TcpListener::bind("[::]:0").expect("bind in namespace"))
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // The namespace's end of the veth goes with it, and the host end with its peer.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
        let _ = Command::new("ip")
            .args(["link", "delete", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}

/// The `spliced` binary under test.
pub fn spliced_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SPLICED_BIN") {
        return bin.into();
    }
    let fallback = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/spliced");
    assert!(
        fallback.exists(),
        "no spliced binary: run the tests with `cargo xtask test`, or set SPLICED_BIN"
    );
    fallback
}

/// Whether a missing eBPF capability must fail the test (CI, or `cargo xtask test`).
pub fn ebpf_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("SPLICED_REQUIRE_EBPF").is_ok_and(|v| v == "1")
}

/// A running spliced with its log.
pub struct Spliced {
    child: Child,
    log: Arc<Mutex<String>>,
    /// The bound address of each route, in the order they were logged.
    pub listening: Vec<SocketAddr>,
}

/// Why a daemon did not come up.
#[derive(Debug)]
pub struct NotStarted {
    pub status: Option<std::process::ExitStatus>,
    pub log: String,
}

impl Spliced {
    /// Starts `spliced ARGS` and waits (at most 20 s) until it has logged `routes` listeners.
    pub fn try_start(args: &[&str], routes: usize) -> Result<Spliced, NotStarted> {
        let mut child = Command::new(spliced_bin())
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("SPLICED_TEST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start spliced");
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let log = log.clone();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        let mut spliced = Spliced {
            child,
            log,
            listening: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            spliced.listening = spliced
                .log()
                .lines()
                .filter_map(|l| l.split("listening on ").nth(1))
                .filter_map(|rest| rest.split(',').next()?.parse().ok())
                .collect();
            if spliced.listening.len() >= routes {
                return Ok(spliced);
            }
            if let Ok(Some(status)) = spliced.child.try_wait() {
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
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start spliced");
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let log = log.clone();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        let mut spliced = Spliced {
            child,
            log,
            listening: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            spliced.listening = spliced
                .log()
                .lines()
                .filter_map(|l| l.split("listening on ").nth(1))
                .filter_map(|rest| rest.split(',').next()?.parse().ok())
                .collect();
            if spliced.listening.len() >= routes {
                return Ok(spliced);
            }
            if let Ok(Some(status)) = spliced.child.try_wait() {
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
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            upstream,
            "--mode",
            mode,
        ];
        args.extend_from_slice(extra);
        Self::start_mode(mode, &args, 1)
    }

    /// Starts spliced with `args`, handling an unavailable sockmap path as [`Spliced::route`].
    pub fn start_mode(mode: &str, args: &[&str], routes: usize) -> Option<Spliced> {
        match Self::try_start(args, routes) {
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

    pub fn addr(&self) -> SocketAddr {
        self.listening[0]
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (at most `limit`) until the log has `count` lines containing `needle`.
    pub fn wait_log(&self, needle: &str, count: usize, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.log();
            if log.lines().filter(|l| l.contains(needle)).count() >= count {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {count} log line(s) with {needle:?} within {limit:?}:\n{log}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Connects a client to the first route.
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(5))
            .expect("connect to spliced");
        set_timeouts(&s, Duration::from_secs(60));
        s
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` and waits (at most `limit`) for the exit status.
    pub fn signal_and_wait(&mut self, signal: i32, limit: Duration) -> std::process::ExitStatus {
        // SAFETY: kill on our own child.
        unsafe { libc::kill(self.pid(), signal) };
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "spliced did not exit within {limit:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics if the daemon has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("wait") {
            panic!("spliced exited: {status}\n{}", self.log());
        }
    }
}

impl Drop for Spliced {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill on our own child.
            unsafe { libc::kill(self.pid(), libc::SIGTERM) };
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
            eprintln!("--- spliced log ---\n{}", self.log());
        }
    }
}

pub fn set_timeouts(s: &TcpStream, t: Duration) {
    s.set_read_timeout(Some(t)).unwrap();
    s.set_write_timeout(Some(t)).unwrap();
}

/// Accepts one connection (at most `limit`), with timeouts set.
pub fn accept(listener: &TcpListener, limit: Duration) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                set_timeouts(&s, Duration::from_secs(60));
                return s;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no connection accepted within {limit:?}"
                );
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A deterministic stream of `len` bytes: 64 KiB blocks of pseudo-random bytes, each starting
/// with its own index, so a lost, duplicated or reordered block changes the hash.
pub struct Payload {
    pub len: u64,
    block: Vec<u8>,
}

pub const BLOCK: usize = 64 * 1024;

impl Payload {
    pub fn new(len: u64, seed: u64) -> Payload {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let block = (0..BLOCK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        Payload { len, block }
    }

    fn block(&mut self, i: u64) -> &[u8] {
        self.block[..8].copy_from_slice(&i.to_le_bytes());
        &self.block
    }

    /// Writes the whole stream to `w`; returns its SHA-256.
    pub fn send(&mut self, w: &mut impl Write) -> io::Result<[u8; 32]> {
        let mut hash = Sha256::new();
        let mut sent = 0u64;
        let mut i = 0;
        while sent < self.len {
            let n = (self.len - sent).min(BLOCK as u64) as usize;
            let b = &self.block(i)[..n];
            w.write_all(b)?;
            hash.update(b);
            sent += n as u64;
            i += 1;
        }
        Ok(hash.finalize().into())
    }

    /// The stream's bytes from `offset` to the end of the 64 KiB block holding it (or of the
    /// stream), for writers that take partial writes: write a prefix, ask again from the new
    /// offset. Empty at or past the end.
    pub fn chunk(&mut self, offset: u64) -> &[u8] {
        let len = self.len;
        let within = (offset % BLOCK as u64) as usize;
        let n = (BLOCK - within).min(len.saturating_sub(offset).min(BLOCK as u64) as usize);
        &self.block(offset / BLOCK as u64)[within..within + n]
    }

    /// The SHA-256 of the stream, without sending it.
    pub fn sha256(&mut self) -> [u8; 32] {
        self.send(&mut io::sink()).unwrap()
    }
}

/// Reads `r` to EOF; returns (bytes, SHA-256).
pub fn receive(r: &mut impl Read) -> io::Result<(u64, [u8; 32])> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            // A signal for another test thread (SIGCHLD of a child it started) can land here.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => r?,
        };
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
}

/// Reads exactly `n` bytes and returns them.
pub fn read_exact(r: &mut impl Read, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).expect("read_exact");
    buf
}

/// Asserts that `s` sees EOF (or a reset) within `limit` and returns how long it took.
pub fn closed_within(s: &mut TcpStream, limit: Duration) -> Duration {
    let t = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return t.elapsed(),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("not closed within {limit:?}")
            }
            Err(_) => return t.elapsed(), // reset
        }
    }
}

/// A half-close exchange over `c` (client side) against `s` (server side): the client sends
/// `req` and SHUT_WR; the server reads to EOF and only then replies `reply` and closes.
pub fn half_close_exchange(c: &mut TcpStream, s: &mut TcpStream, req: &[u8], reply: &[u8]) {
    c.write_all(req).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, req, "request after EOF");
    s.write_all(reply).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(back, reply, "reply after the client's FIN");
}

/// MemAvailable from /proc/meminfo, in bytes.
pub fn mem_available() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .expect("MemAvailable in /proc/meminfo");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Defines one `#[test]` per data path calling `$body(mode)`: `per_mode!(name, body);`.
#[macro_export]
macro_rules! per_mode {
    // The three paths, and `auto`, which starts connections on the copy path and moves them to
    // sockmap after 256 KiB or 100 ms (where sockmap works; splice otherwise).
    ($name:ident, $body:path, and_auto) => {
        mod $name {
            #[test]
            fn sockmap() {
                $body("sockmap")
            }
            #[test]
            fn splice() {
                $body("splice")
            }
            #[test]
            fn copy() {
                $body("copy")
            }
            #[test]
            fn auto() {
                $body("auto")
            }
        }
    };
    ($name:ident, $body:path) => {
        mod $name {
            #[test]
            fn sockmap() {
                $body("sockmap")
            }
            #[test]
            fn splice() {
                $body("splice")
            }
            #[test]
            fn copy() {
                $body("copy")
            }
        }
    };
}
