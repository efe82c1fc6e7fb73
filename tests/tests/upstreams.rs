//! Several upstreams per route (issue 14), against real servers in a network namespace:
//!
//! - failover: 2,000 short connections while one of two servers is killed and restarted, per
//!   data path: not one fails, and the restarted server takes connections again within
//!   `rise × interval` (plus one interval for the check round to come);
//! - every server down, then one back: clients closed at once, counted `no_upstream`, then
//!   served again without a reload;
//! - `backup` only while no primary is up; `weight` 3:1 over 4,000 connections; `leastconn`
//!   with long-lived connections; `source` stickiness, and a reload removing one of three
//!   servers moving only that server's clients;
//! - a refused server and a black-holed address (a link-local address nobody has: the dial gets
//!   no answer) both marked down and skipped;
//! - a 64 MiB upload (SHA-256 on both ends) to one server while the other flaps, per data path;
//! - a reload keeps the servers' health state; `spliced status` and the metrics list each server.
//!
//! Each server is a thread in the test's namespace: it writes its name (one byte) when a
//! connection is accepted, hashes what the client sends until EOF, answers the SHA-256 and closes.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use tests::{
    hup, metric, metrics_addr, per_mode, scrape, set_timeouts, sh, spliced_bin, status, Payload,
    Process, Spliced, TempDir, Topology,
};

const IO: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Servers.

/// A server on a fixed port of the namespace; `kill` closes its listener (new connections are
/// refused; live ones go on), `start` listens again.
struct Backend {
    topo: Arc<Topology>,
    port: u16,
    name: u8,
    running: Option<(i32, JoinHandle<()>)>,
    /// Connections accepted, over every start.
    accepted: Arc<AtomicU64>,
}

impl Backend {
    fn new(topo: &Arc<Topology>, name: u8) -> Backend {
        Backend::at(topo, name, 0)
    }

    /// A server on `port` of the namespace (0: any free port).
    fn at(topo: &Arc<Topology>, name: u8, port: u16) -> Backend {
        let listener =
            topo.in_netns(move || TcpListener::bind(("::", port)).expect("bind in namespace"));
        let port = listener.local_addr().unwrap().port();
        let mut b = Backend {
            topo: topo.clone(),
            port,
            name,
            running: None,
            accepted: Arc::new(AtomicU64::new(0)),
        };
        b.serve(listener);
        b
    }

    fn address(&self) -> String {
        self.topo.upstream(self.port)
    }

    fn start(&mut self) {
        assert!(self.running.is_none());
        let port = self.port;
        let listener = self
            .topo
            .in_netns(move || TcpListener::bind(("::", port)).expect("bind again in namespace"));
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        let fd = listener.as_raw_fd();
        let (name, accepted) = (self.name, self.accepted.clone());
        let thread = thread::spawn(move || {
            // Ends when `kill` shuts the listener down (accept then fails).
            while let Ok((s, _)) = listener.accept() {
                accepted.fetch_add(1, Ordering::Relaxed);
                thread::spawn(move || answer(s, name));
            }
        });
        self.running = Some((fd, thread));
    }

    fn kill(&mut self) {
        let (fd, thread) = self.running.take().expect("running");
        // SAFETY: the listener is alive until its thread returns; shutdown wakes its accept.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        thread.join().unwrap();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.running.is_some() {
            self.kill();
        }
    }
}

fn answer(mut s: TcpStream, name: u8) {
    set_timeouts(&s, Duration::from_secs(120));
    if s.write_all(&[name]).is_err() {
        return;
    }
    let mut hash = Sha256::new();
    let mut buf = vec![0; 256 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hash.update(&buf[..n]),
            Err(_) => return,
        }
    }
    let _ = s.write_all(&hash.finalize());
}

/// A client connection that has read the name of the server it reached.
struct Client {
    s: TcpStream,
    server: u8,
}

impl Client {
    fn connect(addr: SocketAddr) -> Result<Client, String> {
        let mut s = TcpStream::connect_timeout(&addr, IO).map_err(|e| format!("connect: {e}"))?;
        set_timeouts(&s, IO);
        let mut name = [0];
        s.read_exact(&mut name)
            .map_err(|e| format!("no server name: {e}"))?;
        Ok(Client { s, server: name[0] })
    }

    /// Connects from `source` (a loopback address of the host).
    fn connect_from(source: &str, addr: SocketAddr) -> Client {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let from: SocketAddr = format!("{source}:0").parse().unwrap();
        sock.bind(&from.into()).unwrap();
        sock.connect_timeout(&addr.into(), IO).unwrap();
        let mut s: TcpStream = sock.into();
        set_timeouts(&s, IO);
        let mut name = [0];
        s.read_exact(&mut name).expect("server name");
        Client { s, server: name[0] }
    }

    /// Sends `payload` (if any), ends, and checks the server's SHA-256 of it.
    fn finish(mut self, payload: Option<&mut Payload>) -> Result<u8, String> {
        let sent = match payload {
            Some(p) => p.send(&mut self.s).map_err(|e| format!("send: {e}"))?,
            None => Sha256::digest(b"").into(),
        };
        self.s
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        let mut back = Vec::new();
        self.s
            .read_to_end(&mut back)
            .map_err(|e| format!("reply: {e}"))?;
        if back != sent {
            return Err(format!(
                "reply {back:?} is not the SHA-256 of what was sent"
            ));
        }
        Ok(self.server)
    }
}

/// One short connection: the name of the server that took it.
fn short(addr: SocketAddr) -> Result<u8, String> {
    Client::connect(addr)?.finish(None)
}

// ---------------------------------------------------------------------------------------------
// The daemon.

/// Writes the configuration: one route `app` listening on 127.0.0.1:0 with `keys` (upstream,
/// balance, ...), metrics on, the directory's control socket. Returns the file's path.
fn write(dir: &TempDir, mode: &str, keys: &str) -> String {
    let text = format!(
        "mode = \"{mode}\"\ncontrol_socket = \"{}\"\nmetrics = \"127.0.0.1:0\"\n\n\
         [[route]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\n{keys}\n",
        dir.socket()
    );
    dir.write_file("spliced.toml", &text)
}

/// `upstream = [...]` of these servers.
fn list(servers: &[&Backend]) -> String {
    let items: Vec<String> = servers
        .iter()
        .map(|b| format!("\"{}\"", b.address()))
        .collect();
    format!("upstream = [{}]", items.join(", "))
}

fn start(mode: &str, config: &str) -> Option<Spliced> {
    Spliced::start_mode(mode, &["--config", config], 1)
}

/// `spliced status`: the upstream servers' rows, by server name: (state, fields).
fn servers(dir: &TempDir) -> HashMap<String, Vec<String>> {
    let (code, text, err) = status(&["--socket", &dir.socket()], None);
    assert_eq!(code, Some(0), "spliced status: {err}");
    let table = text
        .split_once("upstream server(s)\n")
        .unwrap_or_else(|| panic!("no server table in:\n{text}"))
        .1;
    table
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<String> = l.split_whitespace().map(str::to_owned).collect();
            (f[1].clone(), f)
        })
        .collect()
}

/// Polls `spliced status` until server `name` is in `state` (at most 10 s).
fn wait_state(dir: &TempDir, name: &str, state: &str) -> Duration {
    let t = Instant::now();
    loop {
        let rows = servers(dir);
        if rows.get(name).is_some_and(|f| f[2] == state) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < IO,
            "{name} not {state} within {IO:?}: {rows:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Failover.

const CHECKS: &str =
    "health_check = { interval = \"200ms\", timeout = \"200ms\", rise = 2, fall = 2 }";

fn failover_while_one_restarts(mode: &str) {
    let topo = Arc::new(Topology::new());
    let (mut a, b) = (Backend::new(&topo, b'A'), Backend::new(&topo, b'B'));
    let dir = TempDir::new();
    let config = write(
        &dir,
        mode,
        &format!("{}\n{CHECKS}\nconnect_timeout = \"2s\"", list(&[&a, &b])),
    );
    let Some(spliced) = start(mode, &config) else {
        return;
    };
    // A long-lived connection on B, across everything.
    let mut long = Client::connect(spliced.addr()).unwrap();
    for _ in 0..10 {
        if long.server == b'B' {
            break;
        }
        long.finish(None).unwrap();
        long = Client::connect(spliced.addr()).unwrap();
    }
    assert_eq!(long.server, b'B', "round robin never reached B");
    let (kill_at, restart_at) = (500, 1200);
    let mut restarted = None;
    let mut back_after = None;
    let mut per = [0u32; 2];
    // Connections from the first one A took after its restart, and how many of them A took.
    let (mut since_back, mut a_since_back) = (0u32, 0u32);
    for i in 0..2000 {
        if i == kill_at {
            a.kill();
        }
        if i == restart_at {
            a.start();
            restarted = Some(Instant::now());
        }
        let server = short(spliced.addr())
            .unwrap_or_else(|e| panic!("connection {i} failed: {e}\n{}", spliced.log()));
        per[usize::from(server == b'B')] += 1;
        if (kill_at + 1..restart_at).contains(&i) {
            assert_eq!(server, b'B', "connection {i} reached the killed server");
        }
        if server == b'A' && restarted.is_some() && back_after.is_none() {
            back_after = restarted.map(|t| t.elapsed());
        }
        if back_after.is_some() {
            since_back += 1;
            a_since_back += u32::from(server == b'A');
        }
    }
    let back = back_after.expect("the restarted server took no connection");
    // rise (2) × interval (200 ms), plus up to one interval until the next check round.
    assert!(
        back <= Duration::from_millis(600 + 1000),
        "back after {back:?}"
    );
    // Round robin again once A is back: half of the connections.
    assert!(
        a_since_back * 10 >= since_back * 4,
        "A took {a_since_back} of the {since_back} connections since it was back"
    );
    // The long connection was never moved or cut.
    assert_eq!(
        long.finish(Some(&mut Payload::new(1 << 20, 1))).unwrap(),
        b'B'
    );
    eprintln!(
        "{mode}: A {} B {}, none failed; A back {back:?} after its restart, then took \
         {a_since_back} of {since_back}",
        per[0], per[1]
    );
}

per_mode!(
    failover_2000_short_connections,
    super::failover_while_one_restarts
);

#[test]
fn all_down_then_one_back() {
    let topo = Arc::new(Topology::new());
    let (mut a, mut b) = (Backend::new(&topo, b'A'), Backend::new(&topo, b'B'));
    let dir = TempDir::new();
    let config = write(
        &dir,
        "copy",
        &format!("{}\nconnect_timeout = \"3s\"", list(&[&a, &b])),
    );
    let spliced = start("copy", &config).unwrap();
    let metrics = metrics_addr(&spliced);
    assert!(short(spliced.addr()).is_ok());
    a.kill();
    b.kill();
    for _ in 0..20 {
        let t = Instant::now();
        let r = Client::connect(spliced.addr());
        assert!(r.is_err(), "a client was served with every server down");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "closed after {:?}",
            t.elapsed()
        );
    }
    let text = scrape(metrics);
    assert_eq!(
        metric(
            &text,
            "spliced_connections_failed_total{route=\"app\",reason=\"no_upstream\"}"
        ),
        20
    );
    assert_eq!(
        metric(
            &text,
            &format!(
                "spliced_upstream_up{{route=\"app\",server=\"{}\"}}",
                a.address()
            )
        ),
        0
    );
    b.start();
    // Without health_check, the server a dial found down is probed every 2 s.
    let t = Instant::now();
    let took = wait_state(&dir, &b.address(), "up");
    assert!(took < Duration::from_secs(4), "{took:?}");
    for _ in 0..20 {
        assert_eq!(short(spliced.addr()), Ok(b'B'));
    }
    eprintln!("served again {:?} after the restart", t.elapsed());
}

/// A routing match's own servers are checked like a route's: with no client at all, the
/// match's check finds its server down and up again.
#[test]
fn a_match_set_is_checked_like_a_route_set() {
    let topo = Arc::new(Topology::new());
    let (mut a, b) = (Backend::new(&topo, b'A'), Backend::new(&topo, b'B'));
    let dir = TempDir::new();
    let keys = format!(
        "upstream = \"{}\"\n\n[[route.match]]\nprotocol = \"other\"\nupstream = [\"{}\"]\n{CHECKS}",
        b.address(),
        a.address()
    );
    let config = write(&dir, "copy", &keys);
    let _spliced = start("copy", &config).unwrap();
    wait_state(&dir, &a.address(), "up");
    a.kill();
    let down = wait_state(&dir, &a.address(), "down");
    a.start();
    let up = wait_state(&dir, &a.address(), "up");
    eprintln!("match server found down after {down:?}, up again after {up:?}, no client");
}

#[test]
fn backup_only_while_no_primary_is_up() {
    let topo = Arc::new(Topology::new());
    let (mut a, b) = (Backend::new(&topo, b'A'), Backend::new(&topo, b'B'));
    let dir = TempDir::new();
    let keys = format!(
        "upstream = [\"{}\", {{ address = \"{}\", backup = true }}]\n{CHECKS}",
        a.address(),
        b.address()
    );
    let spliced = start("copy", &write(&dir, "copy", &keys)).unwrap();
    for _ in 0..200 {
        assert_eq!(short(spliced.addr()), Ok(b'A'));
    }
    assert_eq!(servers(&dir)[&b.address()][2], "backup");
    a.kill();
    for i in 0..200 {
        assert_eq!(short(spliced.addr()), Ok(b'B'), "connection {i}");
    }
    a.start();
    wait_state(&dir, &a.address(), "up");
    for _ in 0..100 {
        assert_eq!(short(spliced.addr()), Ok(b'A'));
    }
}

#[test]
fn weights_3_to_1_over_4000() {
    let topo = Arc::new(Topology::new());
    let (a, b) = (Backend::new(&topo, b'A'), Backend::new(&topo, b'B'));
    let dir = TempDir::new();
    let keys = format!(
        "upstream = [{{ address = \"{}\", weight = 3 }}, \"{}\"]",
        a.address(),
        b.address()
    );
    let spliced = start("copy", &write(&dir, "copy", &keys)).unwrap();
    let mut a_count = 0;
    for i in 0..4000 {
        let s = short(spliced.addr()).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        a_count += u32::from(s == b'A');
    }
    eprintln!("weight 3:1 -> {a_count}:{}", 4000 - a_count);
    assert!(
        (2700..=3300).contains(&a_count),
        "A took {a_count} of 4,000"
    );
    assert!(
        (900..=1100).contains(&(4000 - a_count)),
        "B took {}",
        4000 - a_count
    );
}

#[test]
fn leastconn_with_long_lived_connections() {
    let topo = Arc::new(Topology::new());
    let (a, b) = (Backend::new(&topo, b'A'), Backend::new(&topo, b'B'));
    let dir = TempDir::new();
    let keys = format!("{}\nbalance = \"leastconn\"", list(&[&a, &b]));
    let spliced = start("copy", &write(&dir, "copy", &keys)).unwrap();
    let mut held: Vec<Client> = (0..10)
        .map(|_| Client::connect(spliced.addr()).unwrap())
        .collect();
    let on_a = held.iter().filter(|c| c.server == b'A').count();
    assert_eq!(on_a, 5, "10 long connections spread 5/5");
    // A's connections end; the next four all go to A (0 against 5 live).
    let (to_a, rest): (Vec<Client>, Vec<Client>) = held.drain(..).partition(|c| c.server == b'A');
    for c in to_a {
        c.finish(None).unwrap();
    }
    held = rest;
    // The daemon counts a connection out when both sides have closed: wait for the status.
    let t = Instant::now();
    while servers(&dir)[&a.address()][4] != "0" {
        assert!(t.elapsed() < IO, "{:?}", servers(&dir));
        thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..4 {
        let c = Client::connect(spliced.addr()).unwrap();
        assert_eq!(c.server, b'A');
        held.push(c);
    }
    for c in held {
        c.finish(None).unwrap();
    }
}

#[test]
fn source_stickiness_and_a_reload_moving_one_third() {
    let topo = Arc::new(Topology::new());
    let backends = [b'A', b'B', b'C'].map(|n| Backend::new(&topo, n));
    let dir = TempDir::new();
    let all: Vec<&Backend> = backends.iter().collect();
    let keys = |servers: &[&Backend]| format!("{}\nbalance = \"source\"", list(servers));
    let config = write(&dir, "copy", &keys(&all));
    let spliced = start("copy", &config).unwrap();
    let clients: Vec<String> = (0..240)
        .map(|i| format!("127.0.{}.{}", 1 + i / 200, 2 + i % 200))
        .collect();
    let mut before = HashMap::new();
    for c in &clients {
        let first = Client::connect_from(c, spliced.addr());
        let server = first.finish(None).unwrap();
        for _ in 0..2 {
            let again = Client::connect_from(c, spliced.addr())
                .finish(None)
                .unwrap();
            assert_eq!(
                again, server,
                "client {c} moved while the set was unchanged"
            );
        }
        before.insert(c.clone(), server);
    }
    // Remove C by a reload.
    write(&dir, "copy", &keys(&all[..2]));
    hup(&spliced, "reload: configuration applied", 1);
    let t = Instant::now();
    while servers(&dir).contains_key(&backends[2].address()) {
        assert!(t.elapsed() < IO, "C still listed after the reload");
        thread::sleep(Duration::from_millis(20));
    }
    let mut moved = 0;
    for c in &clients {
        let now = Client::connect_from(c, spliced.addr())
            .finish(None)
            .unwrap();
        if now != before[c] {
            assert_eq!(before[c], b'C', "client {c} of a remaining server moved");
            moved += 1;
        }
    }
    let share = f64::from(moved) / clients.len() as f64;
    eprintln!(
        "removing 1 of 3 servers moved {moved} of {} clients",
        clients.len()
    );
    assert!((0.2..=0.47).contains(&share), "moved {share}");
}

#[test]
fn refused_and_black_holed_servers_are_skipped() {
    let topo = Arc::new(Topology::new());
    let mut dead = Backend::new(&topo, b'X');
    dead.kill();
    let live = Backend::new(&topo, b'B');
    // A link-local address nobody on the link has: neighbour discovery never answers, the dial
    // gets no reply.
    let hole = format!("[fe80::99%{}]:{}", topo.host_if, live.port);
    let dir = TempDir::new();
    let keys = format!(
        "upstream = [\"{}\", \"{hole}\", \"{}\"]\nconnect_timeout = \"3s\"",
        dead.address(),
        live.address()
    );
    let spliced = start("copy", &write(&dir, "copy", &keys)).unwrap();
    for i in 0..50 {
        let t = Instant::now();
        assert_eq!(short(spliced.addr()), Ok(b'B'), "connection {i}");
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "connection {i} took {:?}",
            t.elapsed()
        );
    }
    let rows = servers(&dir);
    assert_eq!(rows[&dead.address()][2], "down", "{rows:?}");
    assert_eq!(rows[&hole][2], "down", "{rows:?}");
    assert_eq!(rows[&live.address()][2], "up", "{rows:?}");
    let text = scrape(metrics_addr(&spliced));
    let failures = |s: &str| {
        metric(
            &text,
            &format!("spliced_upstream_dial_failures_total{{route=\"app\",server=\"{s}\"}}"),
        )
    };
    // Each was tried once, then skipped (the recovery probe takes over).
    assert_eq!((failures(&dead.address()), failures(&hole)), (1, 1));
    assert_eq!(
        metric(
            &text,
            &format!(
                "spliced_upstream_connections_total{{route=\"app\",server=\"{}\"}}",
                live.address()
            )
        ),
        50
    );
}

fn upload_while_the_other_flaps(mode: &str) {
    let topo = Arc::new(Topology::new());
    let (mut a, mut b) = (Backend::new(&topo, b'A'), Backend::new(&topo, b'B'));
    let dir = TempDir::new();
    let keys = format!("{}\nbalance = \"leastconn\"\n{CHECKS}", list(&[&a, &b]));
    let Some(spliced) = start(mode, &write(&dir, mode, &keys)) else {
        return;
    };
    // leastconn: with one connection held, the bulk connection goes to the other server.
    let held = Client::connect(spliced.addr()).unwrap();
    let held_on = held.server;
    let bulk = Client::connect(spliced.addr()).unwrap();
    assert_ne!(bulk.server, held_on);
    let (bulk_on, addr) = (bulk.server, spliced.addr());
    let mut payload = Payload::new(tests::bulk_bytes(64 << 20), 14);
    let upload = thread::spawn(move || bulk.finish(Some(&mut payload)));
    // Flap the other server (the held connection's: it lives on) and keep connecting.
    let other = if bulk_on == b'A' { &mut b } else { &mut a };
    let mut flaps = 0;
    let t = Instant::now();
    {
        while (flaps < 3 || !upload.is_finished()) && t.elapsed() < Duration::from_secs(60) {
            other.kill();
            for _ in 0..5 {
                short(addr).unwrap();
            }
            thread::sleep(Duration::from_millis(20));
            other.start();
            thread::sleep(Duration::from_millis(20));
            flaps += 1;
        }
    }
    assert_eq!(upload.join().unwrap(), Ok(bulk_on), "the 64 MiB upload");
    held.finish(None)
        .unwrap_or_else(|e| panic!("the held connection: {e}"));
    eprintln!(
        "{mode}: 64 MiB to {} while the other flapped {flaps} times",
        bulk_on as char
    );
}

per_mode!(
    upload_64mib_while_the_other_flaps,
    super::upload_while_the_other_flaps
);

#[test]
fn reload_keeps_health_state() {
    let topo = Arc::new(Topology::new());
    let (mut a, b) = (Backend::new(&topo, b'A'), Backend::new(&topo, b'B'));
    let dir = TempDir::new();
    let slow = "health_check = { interval = \"1h\", timeout = \"1s\", rise = 1, fall = 1 }";
    let spliced = start(
        "copy",
        &write(&dir, "copy", &format!("{}\n{slow}", list(&[&a, &b]))),
    )
    .unwrap();
    let metrics = metrics_addr(&spliced);
    a.kill();
    // A dial finds A down (or, on a slow machine, the first check round did, if it ran after
    // the kill).
    for _ in 0..4 {
        assert_eq!(short(spliced.addr()), Ok(b'B'));
    }
    assert_eq!(servers(&dir)[&a.address()][2], "down");
    let live = Client::connect(spliced.addr()).unwrap();
    // A reload adding a third server: A stays down (checked once an hour, it is not tried).
    let c = Backend::new(&topo, b'C');
    write(&dir, "copy", &format!("{}\n{slow}", list(&[&a, &b, &c])));
    hup(&spliced, "reload: configuration applied", 1);
    let t = Instant::now();
    while !servers(&dir).contains_key(&c.address()) {
        assert!(t.elapsed() < IO);
        thread::sleep(Duration::from_millis(20));
    }
    let rows = servers(&dir);
    assert_eq!(rows[&a.address()][2], "down", "{rows:?}");
    let failures = format!(
        "spliced_upstream_dial_failures_total{{route=\"app\",server=\"{}\"}}",
        a.address()
    );
    let before = metric(&scrape(metrics), &failures);
    assert!(before <= 1, "A was dialed {before} times");
    for _ in 0..20 {
        assert_ne!(short(spliced.addr()), Ok(b'A'));
    }
    assert_eq!(
        metric(&scrape(metrics), &failures),
        before,
        "A was tried after the reload"
    );
    assert_eq!(live.finish(Some(&mut Payload::new(1 << 20, 3))), Ok(b'B'));
}

/// Adds `2001:db8:PID:N::1/64` (host side) and `::2` (inside) to the topology's veth and returns
/// the inside address: a global address unique to this process and topology (the helper's IPv4
/// /30s are numbered per process, so two test processes on one machine can route the same /30
/// to different namespaces).
fn global_address(topo: &Topology) -> String {
    let prefix = format!("2001:db8:{:x}:{:x}", std::process::id() % 0xffff, topo.n);
    let host = format!("{prefix}::1/64");
    sh(&["ip", "addr", "add", &host, "dev", &topo.host_if, "nodad"]);
    let inside = format!("{prefix}::2/64");
    sh(&[
        "ip",
        "-n",
        &topo.netns,
        "addr",
        "add",
        &inside,
        "dev",
        "eth0",
        "nodad",
    ]);
    // As std writes it (zeros compressed), like the daemon's server names.
    let ip: std::net::Ipv6Addr = format!("{prefix}::2").parse().unwrap();
    ip.to_string()
}

/// spliced in a mount namespace of its own whose /etc/hosts is `hosts` (the host's stays
/// untouched): `unshare -m` bind-mounts the file, then execs the daemon. Returns the process and
/// the route's address.
fn with_hosts(dir: &TempDir, hosts: &str, config: &str) -> (Process, SocketAddr) {
    let hosts_file = dir.write_file("hosts", hosts);
    let script = "mount --bind \"$0\" /etc/hosts && exec \"$1\" --config \"$2\"";
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-m", "sh", "-c", script, &hosts_file])
        .arg(spliced_bin())
        .arg(config)
        .env("RUST_LOG", "info");
    let daemon = Process::spawn("spliced (unshare -m)", &mut cmd);
    let log = daemon.wait_log("listening on ", 1, IO);
    let rest = log.split("listening on ").nth(1).unwrap();
    let addr = rest.split(',').next().unwrap().parse().unwrap();
    (daemon, addr)
}

#[test]
fn a_host_name_with_two_addresses_is_two_servers() {
    let (one, two) = (Arc::new(Topology::new()), Arc::new(Topology::new()));
    let a = Backend::new(&one, b'A');
    let mut b = Backend::at(&two, b'B', a.port);
    let (ip_a, ip_b) = (global_address(&one), global_address(&two));
    let dir = TempDir::new();
    let config = write(&dir, "copy", &format!("upstream = \"app.test:{}\"", a.port));
    let hosts = format!("127.0.0.1 localhost\n{ip_a} app.test\n{ip_b} app.test\n");
    let (ip_a, ip_b) = (format!("[{ip_a}]"), format!("[{ip_b}]"));
    let (_daemon, addr) = with_hosts(&dir, &hosts, &config);
    let mut seen = [0; 2];
    for i in 0..100 {
        let s = short(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        seen[usize::from(s == b'B')] += 1;
    }
    assert_eq!(seen, [50, 50], "round robin over the name's two addresses");
    let rows = servers(&dir);
    let name = |ip: &str| format!("app.test:{}@{ip}:{}", a.port, a.port);
    assert_eq!(rows[&name(&ip_a)][2], "up", "{rows:?}");
    assert_eq!(rows[&name(&ip_b)][2], "up", "{rows:?}");
    b.kill();
    for i in 0..50 {
        assert_eq!(short(addr), Ok(b'A'), "connection {i}");
    }
    assert_eq!(servers(&dir)[&name(&ip_b)][2], "down");
}
