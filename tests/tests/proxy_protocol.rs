//! The PROXY protocol (issue 13) with real software from Debian's packages, per data path.
//!
//! Four namespaces of the test's own (a [`Lab`]), addresses only from the documentation ranges
//! and link-local: the client C, a front proxy F (HAProxy), spliced S and the upstreams U.
//!
//! ```text
//! C 203.0.113.2/28  --  F 203.0.113.1/28       F 198.51.100.2/28 -- S 198.51.100.1/28
//! C 203.0.113.18/28 --  S 203.0.113.17/28      S fe80::1 (up0)   -- U fe80::2 (eth0)
//! ```
//!
//! - Sending: HAProxy (`accept-proxy`, answering `%[src]`) and nginx (`listen ... proxy_protocol`,
//!   answering `$proxy_protocol_addr`) in U, reached at a link-local address, read the IPv4
//!   client's address from spliced's v1 and v2 headers; HAProxy also reads the v2 AUTHORITY the
//!   peek saw. 64 MiB after the header reach a raw upstream (reading the header with spliced's
//!   parser) intact (SHA-256).
//! - `spliced check` lists `accept_proxy`; a bad prefix is an error at its line and column.
//! - Accepting (`accept_proxy = ["198.51.100.0/28"]`, spliced listening on `[::]`, so IPv4
//!   sources arrive IPv4-mapped): behind a real HAProxy `send-proxy-v2` front, the upstream (from
//!   spliced's own v2 header) and spliced's log and status see the original client, and 64 MiB
//!   arrive intact; HAProxy's health checks (v2 LOCAL) are forwarded as the front's own;
//!   `balance = "source"` balances on the header's client, not on the front. An
//!   untrusted client's PROXY header reaches the upstream verbatim, as data. A trusted source
//!   without a header, with broken ones, silent, or closing halfway is closed, logged and counted
//!   by reason; headers split over several segments with pauses work, with the client's bytes
//!   that came with the last piece delivered (and, on a route with matches, peeked); the header
//!   and the peek after it share one `peek_timeout`.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use spliced::proxy_header::{self, Origin, Parsed, Progress, Seen as TlvSeen, Version};
use tests::{
    bulk_bytes, closed_lines, fields, metric, per_mode, scrape, set_timeouts, status, wait_until,
    Lab, Payload, Spliced, TempDir, LOG_WAIT,
};

const C: usize = 0;
const F: usize = 1;
const S: usize = 2;
const U: usize = 3;

/// The client's address toward spliced, and toward the front proxy.
const CLIENT_S: &str = "203.0.113.18";
const CLIENT_F: &str = "203.0.113.2";
/// The front proxy's address toward spliced (inside `accept_proxy`).
const FRONT: &str = "198.51.100.2";
/// spliced's addresses toward the client and toward the front proxy.
const SPLICED_C: &str = "203.0.113.17";
const SPLICED_F: &str = "198.51.100.1";
/// The raw upstream's ports in U (the second one a second server for source balancing).
const RAW: u16 = 9000;
const RAW2: u16 = 9010;
const IO: Duration = Duration::from_secs(60);

/// The four namespaces and their links.
fn lab() -> Lab {
    let lab = Lab::new(4);
    lab.link(
        (C, "f0", &["203.0.113.2/28"]),
        (F, "c0", &["203.0.113.1/28"]),
    );
    lab.link(
        (C, "s0", &["203.0.113.18/28"]),
        (S, "c0", &["203.0.113.17/28"]),
    );
    lab.link(
        (F, "s0", &["198.51.100.2/28"]),
        (S, "f0", &["198.51.100.1/28"]),
    );
    lab.link((S, "up0", &["fe80::1/64"]), (U, "eth0", &["fe80::2/64"]));
    lab
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

/// Waits (at most 20 s) until TCP `ports` listen in namespace `ns`.
fn wait_listening(lab: &Lab, ns: usize, ports: &[u16]) {
    let name = lab.ns(ns).to_owned();
    let listening = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &name, "ss", "-Hltn"])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ports
            .iter()
            .all(|p| text.contains(&format!(":{p} ")))
            .then_some(())
    };
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        listening,
        || format!("ports {ports:?} do not listen in {name} after 20 s"),
    );
}

// ---------------------------------------------------------------------------------------------
// A raw upstream: reads the PROXY header with spliced's parser, then hashes the rest.

/// What the raw upstream saw of one connection.
#[derive(Debug)]
struct Got {
    /// The port it came in on.
    server: u16,
    header: Parsed,
    /// Bytes after the header, their SHA-256, and the first 4 KiB of them.
    len: u64,
    sha: [u8; 32],
    head: Vec<u8>,
}

impl Got {
    fn source(&self) -> Option<SocketAddr> {
        match self.header {
            Parsed::Proxied(o) => Some(o.source),
            Parsed::Local => None,
        }
    }
}

/// Listeners on `[::]:RAW` and `[::]:RAW2` in U; every connection's [`Got`] comes out of `rx`.
/// They accept until dropped (the listeners close then, so the namespace can go) or 10 minutes
/// pass.
struct RawUpstream {
    rx: mpsc::Receiver<Got>,
    stop: Arc<AtomicBool>,
}

impl RawUpstream {
    fn start(lab: &Lab) -> RawUpstream {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        for port in [RAW, RAW2] {
            let listener = lab.run_in(U, move || TcpListener::bind(("::", port)).expect("bind"));
            listener.set_nonblocking(true).unwrap();
            let (stopped, tx) = (stop.clone(), tx.clone());
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(600);
                while Instant::now() < deadline && !stopped.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let tx = tx.clone();
                            thread::spawn(move || {
                                if let Some(got) = read_upstream(s, port) {
                                    let _ = tx.send(got);
                                }
                            });
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
        }
        RawUpstream { rx, stop }
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One connection: the header, then everything to EOF (or a reset). `None` when it broke off
/// before the header was complete.
fn read_upstream(mut s: TcpStream, server: u16) -> Option<Got> {
    s.set_nonblocking(false).ok()?;
    set_timeouts(&s, IO);
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    let (header, used) = loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        match proxy_header::parse(&buf) {
            Progress::NeedMore => continue,
            Progress::Done(parsed, len) => break (parsed, len),
            // Nothing reaches the test, whose wait then fails naming the source it expected.
            Progress::Failed(why) => {
                eprintln!("the upstream got no valid PROXY header: {why}");
                return None;
            }
        }
    };
    let mut hash = Sha256::new();
    let mut head = buf.split_off(used);
    hash.update(&head);
    let mut len = head.len() as u64;
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // A reset after the header (a health check): what came so far.
            Err(_) => break,
        };
        hash.update(&chunk[..n]);
        len += n as u64;
        if head.len() < 4096 {
            head.extend_from_slice(&chunk[..n.min(4096 - head.len())]);
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    Some(Got {
        server,
        header,
        len,
        sha: hash.finalize().into(),
        head,
    })
}

/// The first connection the raw upstream reports whose header names `source` (at most 60 s).
fn got_from(raw: &RawUpstream, source: SocketAddr) -> Got {
    let deadline = Instant::now() + IO;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match raw.rx.recv_timeout(left) {
            Ok(got) if got.source() == Some(source) => return got,
            Ok(_) => continue,
            Err(e) => panic!("the upstream saw no connection from {source}: {e}"),
        }
    }
}

/// Connects from namespace `ns` to `to`, sends `bytes` (in pieces, pausing `pause` between
/// them), half-closes and waits for the other side's end. Returns the client's address and
/// what came back (empty, or an error text when the connection was reset).
fn send_from(
    lab: &Lab,
    ns: usize,
    to: SocketAddr,
    pieces: Vec<Vec<u8>>,
    pause: Duration,
) -> (SocketAddr, String) {
    lab.run_in(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect {to}: {e}"));
        set_timeouts(&s, IO);
        s.set_nodelay(true).unwrap();
        let local = s.local_addr().unwrap();
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 {
                thread::sleep(pause);
            }
            if let Err(e) = s.write_all(piece) {
                return (local, format!("write failed: {e}"));
            }
        }
        let _ = s.shutdown(Shutdown::Write);
        let mut back = Vec::new();
        match s.read_to_end(&mut back) {
            Ok(_) => (local, String::from_utf8_lossy(&back).into_owned()),
            Err(e) => (local, format!("read failed: {e}")),
        }
    })
}

/// Sends `payload` from namespace `ns` to `to` and half-closes; returns the client's address
/// and the payload's SHA-256 once the other side closed.
fn send_payload(
    lab: &Lab,
    ns: usize,
    to: SocketAddr,
    mut payload: Payload,
) -> (SocketAddr, [u8; 32]) {
    lab.run_in(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect {to}: {e}"));
        set_timeouts(&s, IO);
        let local = s.local_addr().unwrap();
        let sha = payload.send(&mut s).expect("send the payload");
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("the upstream's close");
        (local, sha)
    })
}

// ---------------------------------------------------------------------------------------------
// Sending: real backends read spliced's headers.

/// HAProxy in U: HTTP frontends with `accept-proxy` answering the client address they saw.
const HAPROXY_BACKENDS: &str = r#"global
  maxconn 200
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend v1
  bind [::]:8101 accept-proxy
  http-request return status 200 content-type text/plain lf-string "%[src]"
frontend v2
  bind [::]:8102 accept-proxy
  http-request return status 200 content-type text/plain lf-string "%[src] %[fc_pp_authority]"
"#;

/// nginx in U: `listen ... proxy_protocol` answering `$proxy_protocol_addr`.
fn nginx_conf(dir: &TempDir) -> String {
    format!(
        r#"daemon off;
worker_processes 1;
error_log stderr;
pid {pid};
events {{ worker_connections 64; }}
http {{
  access_log off;
  server {{ listen [::]:8201 proxy_protocol; return 200 "$proxy_protocol_addr\n"; }}
  server {{ listen [::]:8202 proxy_protocol; return 200 "$proxy_protocol_addr\n"; }}
}}
"#,
        pid = dir.file("nginx.pid")
    )
}

/// spliced's routes for the sending test: one per backend and version, at the backend's port.
fn sending_routes(dir: &TempDir, mode: &str) -> String {
    let mut text = format!(
        "mode = \"{mode}\"\ncontrol_socket = \"{}\"\n",
        dir.file("control.sock")
    );
    for (name, port, version) in [
        ("haproxy-v1", 8101, "v1"),
        ("nginx-v1", 8201, "v1"),
        ("nginx-v2", 8202, "v2"),
        ("raw-v1", 9001, "v1"),
        ("raw-v2", 9002, "v2"),
    ] {
        let upstream_port = if name.starts_with("raw") { RAW } else { port };
        text += &format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"[::]:{port}\"\n\
             upstream = \"[fe80::2%up0]:{upstream_port}\"\nproxy_protocol = \"{version}\"\n"
        );
    }
    // v2 to HAProxy through a Host match: the AUTHORITY TLV carries the name the peek saw.
    text += "[[route]]\nname = \"haproxy-v2\"\nlisten = \"[::]:8102\"\nproxy_protocol = \"v2\"\n\
             [[route.match]]\nhost = [\"app.example\"]\nupstream = \"[fe80::2%up0]:8102\"\n";
    text
}

/// An HTTP GET from C to spliced's `port`; returns the client's address and the reply's body.
fn get(lab: &Lab, port: u16) -> (SocketAddr, String) {
    let request = b"GET / HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n".to_vec();
    let (local, reply) = send_from(lab, C, addr(SPLICED_C, port), vec![request], Duration::ZERO);
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP reply on port {port}: {reply:?}"));
    assert!(head.starts_with("HTTP/1.1 200"), "port {port}: {reply}");
    (local, body.trim().to_owned())
}

fn real_backends_read_the_header(mode: &str) {
    let lab = lab();
    let dir = TempDir::new();
    let haproxy_cfg = dir.write_file("haproxy.cfg", HAPROXY_BACKENDS);
    let nginx_cfg = dir.write_file("nginx.conf", &nginx_conf(&dir));
    let _haproxy = lab.spawn(
        U,
        "haproxy",
        Path::new("/usr/sbin/haproxy"),
        &["-db", "-f", &haproxy_cfg],
    );
    let _nginx = lab.spawn(
        U,
        "nginx",
        Path::new("/usr/sbin/nginx"),
        &["-e", "stderr", "-c", &nginx_cfg],
    );
    let raw = RawUpstream::start(&lab);
    let config = dir.write_file("spliced.toml", &sending_routes(&dir, mode));
    let Some(spliced) = Spliced::start_mode_in_netns(mode, lab.ns(S), &["--config", &config], 6)
    else {
        return;
    };
    wait_listening(&lab, U, &[8101, 8102, 8201, 8202, RAW]);
    for port in [8101, 8201, 8202] {
        let (local, body) = get(&lab, port);
        assert_eq!(local.ip().to_string(), CLIENT_S);
        assert_eq!(
            body, CLIENT_S,
            "the backend on port {port} saw another client"
        );
    }
    let (_, body) = get(&lab, 8102);
    assert_eq!(
        body,
        format!("{CLIENT_S} app.example"),
        "HAProxy: src and AUTHORITY"
    );
    for (port, seed) in [(9001, 1), (9002, 2)] {
        let payload = Payload::new(bulk_bytes(64 << 20), seed);
        let len = payload.len;
        let (local, sha) = send_payload(&lab, C, addr(SPLICED_C, port), payload);
        let got = got_from(&raw, local);
        let want = Origin {
            source: local,
            destination: addr(SPLICED_C, port),
        };
        assert_eq!(got.header, Parsed::Proxied(want), "port {port}");
        assert_eq!(
            (got.len, got.sha),
            (len, sha),
            "port {port}: the bytes after the header"
        );
    }
    spliced.wait_log("connection closed", 6, LOG_WAIT);
}
per_mode!(
    real_backends_read_the_header_per_path,
    super::real_backends_read_the_header,
    and_auto
);

// ---------------------------------------------------------------------------------------------
// Accepting: spliced behind a real HAProxy front, and trusted sources misbehaving.

/// HAProxy in F: a TCP front for the client, to spliced with `send-proxy-v2` (its health checks
/// send v2 LOCAL headers).
const HAPROXY_FRONT: &str = r#"global
  maxconn 200
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend front
  bind 203.0.113.1:7000
  default_backend spliced
backend spliced
  server s 198.51.100.1:7443 send-proxy-v2 check inter 300ms
"#;

fn accepting_routes(dir: &TempDir, mode: &str) -> String {
    format!(
        r#"mode = "{mode}"
control_socket = "{socket}"
metrics = "127.0.0.1:9180"

[[route]]
name = "front"
listen = "[::]:7443"
accept_proxy = ["198.51.100.0/28", "2001:db8::/32"]
peek_timeout = "1s"
proxy_protocol = "v2"
upstream = "[fe80::2%up0]:{RAW}"

[[route]]
name = "balanced"
listen = "[::]:7445"
accept_proxy = ["198.51.100.0/28"]
proxy_protocol = "v1"
balance = "source"
upstream = ["[fe80::2%up0]:{RAW}", "[fe80::2%up0]:{RAW2}"]

[[route]]
name = "routed"
listen = "[::]:7444"
accept_proxy = ["198.51.100.0/28"]
peek_timeout = "2s"
proxy_protocol = "v1"

[[route.match]]
host = ["app.example"]
upstream = "[fe80::2%up0]:{RAW}"
"#,
        socket = dir.file("control.sock")
    )
}

/// spliced's metrics, scraped inside its namespace.
fn metrics(lab: &Lab) -> String {
    lab.run_in(S, || scrape(addr("127.0.0.1", 9180)))
}

/// A v2 header naming `source` as the client of `destination`.
fn v2_header(source: &str, destination: &str) -> Vec<u8> {
    let origin = Origin {
        source: source.parse().unwrap(),
        destination: destination.parse().unwrap(),
    };
    proxy_header::encode(Version::V2, origin, TlvSeen::default())
}

fn behind_a_front_proxy(mode: &str) {
    let lab = lab();
    let dir = TempDir::new();
    let raw = RawUpstream::start(&lab);
    let config = dir.write_file("spliced.toml", &accepting_routes(&dir, mode));
    let Some(spliced) = Spliced::start_mode_in_netns(mode, lab.ns(S), &["--config", &config], 3)
    else {
        return;
    };
    let front_cfg = dir.write_file("haproxy.cfg", HAPROXY_FRONT);
    let _front = lab.spawn(
        F,
        "haproxy",
        Path::new("/usr/sbin/haproxy"),
        &["-db", "-f", &front_cfg],
    );
    wait_listening(&lab, F, &[7000]);
    front_proxied(&lab, &spliced, &raw, &dir);
    untrusted_header_is_data(&lab, &raw);
    split_headers(&lab, &raw);
    balanced_by_the_headers_source(&lab, &raw);
    refused_headers(&lab, &spliced);
    header_and_peek_share_one_timeout(&lab);
}

/// On a route with matches the PROXY header and the peek after it share one `peek_timeout`
/// (2 s on "routed", no default upstream): a header sent after 1.2 s leaves the peek 0.8 s, so
/// a front that then sends nothing is closed about 2 s after it connected, not 3.2 s.
fn header_and_peek_share_one_timeout(lab: &Lab) {
    let to = addr(SPLICED_F, 7444);
    let took = lab.run_in(F, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10)).unwrap();
        set_timeouts(&s, Duration::from_secs(10));
        let started = Instant::now();
        thread::sleep(Duration::from_millis(1200));
        s.write_all(b"PROXY TCP4 203.0.113.70 198.51.100.1 5000 7444\r\n")
            .unwrap();
        let mut back = Vec::new();
        let end = s.read_to_end(&mut back);
        let timed_out =
            |e: &std::io::Error| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
        assert!(!end.as_ref().is_err_and(timed_out), "not closed: {end:?}");
        started.elapsed()
    });
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(2800),
        "closed {took:?} after connecting; peek_timeout is 2 s for header and peek together"
    );
}

/// `balance = "source"` balances on the header's client, not on the front proxy: every
/// connection comes from the same front address, yet the clients it names spread over both
/// servers, each client staying on its own.
fn balanced_by_the_headers_source(lab: &Lab, raw: &RawUpstream) {
    let mut servers = std::collections::BTreeMap::new();
    for round in 0..2 {
        for i in 60..68 {
            let source = format!("203.0.113.{i}:5000");
            let header = format!("PROXY TCP4 203.0.113.{i} {SPLICED_F} 5000 7445\r\n");
            let to = addr(SPLICED_F, 7445);
            send_from(lab, F, to, vec![header.into_bytes()], Duration::ZERO);
            let got = got_from(raw, source.parse().unwrap());
            let first = *servers.entry(i).or_insert(got.server);
            assert_eq!(
                got.server, first,
                "{source} moved in round {round}: {servers:?}"
            );
        }
    }
    let used: std::collections::BTreeSet<u16> = servers.values().copied().collect();
    assert_eq!(
        used.len(),
        2,
        "the header's clients all went to one server: {servers:?}"
    );
}
per_mode!(
    behind_a_front_proxy_per_path,
    super::behind_a_front_proxy,
    and_auto
);

/// Client -> HAProxy (send-proxy-v2) -> spliced: the upstream, the log and the status see the
/// client; 64 MiB arrive intact; HAProxy's LOCAL health checks pass as the front's own.
fn front_proxied(lab: &Lab, spliced: &Spliced, raw: &RawUpstream, dir: &TempDir) {
    let payload = Payload::new(bulk_bytes(64 << 20), 3);
    let len = payload.len;
    let (local, sha) = send_payload(lab, C, addr("203.0.113.1", 7000), payload);
    assert_eq!(local.ip().to_string(), CLIENT_F);
    let got = got_from(raw, local);
    let want = Origin {
        source: local,
        destination: addr("203.0.113.1", 7000),
    };
    assert_eq!(
        got.header,
        Parsed::Proxied(want),
        "spliced's header names the client"
    );
    assert_eq!(
        (got.len, got.sha),
        (len, sha),
        "the bytes after the headers"
    );
    let needle = format!("client={local} ");
    let log = spliced.wait_log(&needle, 1, LOG_WAIT);
    let line = closed_lines(&log)
        .into_iter()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no closed line for {local}:\n{log}"));
    let f = fields(line);
    assert!(f["via"].starts_with(&format!("{FRONT}:")), "{line}");
    assert_eq!(f["end"], "complete", "{line}");
    live_status(lab, dir);
    // HAProxy checks every 300 ms with a v2 LOCAL header: forwarded as the front's connection.
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let text = metrics(lab);
            (metric(
                &text,
                "spliced_proxy_header_total{route=\"front\",outcome=\"local\"}",
            ) >= 2)
                .then_some(())
        },
        || format!("no LOCAL health checks counted:\n{}", metrics(lab)),
    );
    let front = addr(FRONT, 0).ip();
    let check = got_local(raw);
    assert_eq!(
        check.ip(),
        front,
        "a LOCAL connection's header names the front itself"
    );
}

/// The source spliced's header gave for the next LOCAL (health check) connection: the front.
fn got_local(raw: &RawUpstream) -> SocketAddr {
    let deadline = Instant::now() + IO;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = raw
            .rx
            .recv_timeout(left)
            .expect("no health check connection reached the upstream");
        if let (Some(source), 0) = (got.source(), got.len) {
            if source.ip().to_string() == FRONT {
                return source;
            }
        }
    }
}

/// `spliced status` lists a live connection through the front under the client, VIA the front.
fn live_status(lab: &Lab, dir: &TempDir) {
    let to = addr("203.0.113.1", 7000);
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (local_tx, local_rx) = mpsc::channel();
    let ns = lab.ns(C).to_owned();
    let holder = thread::spawn(move || {
        tests::xdp_net::Net::run_in(&ns, move || {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10)).unwrap();
            s.write_all(b"held open").unwrap();
            local_tx.send(s.local_addr().unwrap()).unwrap();
            let _ = stop_rx.recv_timeout(Duration::from_secs(30));
        })
    });
    let local = local_rx.recv_timeout(Duration::from_secs(15)).unwrap();
    let socket = dir.file("control.sock");
    let row = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let (code, out, _) = status(&["--socket", &socket], None);
            assert_eq!(code, Some(0), "{out}");
            out.lines()
                .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                .find(|f| f.get(1) == Some(&local.to_string()))
        },
        || format!("status never listed {local}"),
    );
    assert!(row[9].starts_with(&format!("{FRONT}:")), "VIA: {row:?}");
    stop_tx.send(()).unwrap();
    holder.join().unwrap();
}

/// A client outside `accept_proxy` sending a PROXY header: its bytes reach the upstream as sent.
fn untrusted_header_is_data(lab: &Lab, raw: &RawUpstream) {
    let fake = b"PROXY TCP4 198.51.100.99 203.0.113.17 1111 7443\r\nhello".to_vec();
    let (local, _) = send_from(
        lab,
        C,
        addr(SPLICED_C, 7443),
        vec![fake.clone()],
        Duration::ZERO,
    );
    assert_eq!(local.ip().to_string(), CLIENT_S);
    let got = got_from(raw, local);
    assert_eq!(got.head, fake, "the untrusted header is data, verbatim");
}

/// Trusted headers split over several segments with pauses between them, the client's first
/// bytes in the last one: read, and the bytes delivered (on a route with matches, peeked).
fn split_headers(lab: &Lab, raw: &RawUpstream) {
    let spliced_f = format!("{SPLICED_F}:7443");
    let cases = [
        (
            b"PROXY TCP4 203.0.113.50 198.51.100.1 4321 7443\r\n".to_vec(),
            "203.0.113.50:4321",
            7443,
            b"first bytes after a v1 header".to_vec(),
        ),
        (
            v2_header("[2001:db8::50]:4322", "[2001:db8::1]:7443"),
            "[2001:db8::50]:4322",
            7443,
            b"first bytes after a v2 header".to_vec(),
        ),
        (
            v2_header("203.0.113.51:4323", &spliced_f),
            "203.0.113.51:4323",
            7444,
            b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n".to_vec(),
        ),
    ];
    for (header, source, port, data) in cases {
        let third = header.len() / 3;
        let mut last = header[2 * third..].to_vec();
        last.extend_from_slice(&data);
        let pieces = vec![
            header[..third].to_vec(),
            header[third..2 * third].to_vec(),
            last,
        ];
        let to = addr(SPLICED_F, port);
        send_from(lab, F, to, pieces, Duration::from_millis(150));
        let got = got_from(raw, source.parse().unwrap());
        assert_eq!(got.head, data, "after the header from {source}");
    }
}

/// Trusted sources without a valid header: closed, logged with the reason, counted.
fn refused_headers(lab: &Lab, spliced: &Spliced) {
    let mut bad_version = v2_header("203.0.113.52:1", &format!("{SPLICED_F}:7443"));
    bad_version[12] = 0x31;
    let half = v2_header("203.0.113.53:1", &format!("{SPLICED_F}:7443"))[..20].to_vec();
    let cases: [(Vec<u8>, &str); 5] = [
        (
            b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n".to_vec(),
            "missing",
        ),
        (
            b"PROXY TCP4 300.1.2.3 198.51.100.1 1 7443\r\n".to_vec(),
            "malformed",
        ),
        (bad_version, "malformed"),
        (half, "truncated"),
        (Vec::new(), "timeout"),
    ];
    let before = metrics(lab);
    let count = |text: &str, outcome: &str| {
        metric(
            text,
            &format!("spliced_proxy_header_total{{route=\"front\",outcome=\"{outcome}\"}}"),
        )
    };
    for (i, (bytes, reason)) in cases.iter().enumerate() {
        let to = addr(SPLICED_F, 7443);
        let started = Instant::now();
        let (local, _) = if bytes.is_empty() {
            // Silent: spliced closes after peek_timeout (1 s) while the client still waits.
            silent_from(lab, to)
        } else {
            send_from(lab, F, to, vec![bytes.clone()], Duration::ZERO)
        };
        assert!(started.elapsed() < Duration::from_secs(10));
        let needle = "PROXY header refused";
        let log = spliced.wait_log(needle, i + 1, LOG_WAIT);
        // spliced listens on [::]: the front's IPv4 address arrives IPv4-mapped.
        let client = format!("client=[::ffff:{}]:{} ", local.ip(), local.port());
        let line = log
            .lines()
            .find(|l| l.contains(needle) && l.contains(&client))
            .unwrap_or_else(|| panic!("no refusal logged for {local}:\n{log}"));
        assert!(line.contains(&format!("reason={reason}")), "{line}");
    }
    let after = metrics(lab);
    for reason in ["missing", "malformed", "truncated", "timeout"] {
        let want = cases.iter().filter(|(_, r)| *r == reason).count() as u64;
        assert_eq!(
            count(&after, reason) - count(&before, reason),
            want,
            "{reason}:\n{after}"
        );
    }
    let failed = "spliced_connections_failed_total{route=\"front\",reason=\"proxy_header\"}";
    assert_eq!(
        metric(&after, failed) - metric(&before, failed),
        5,
        "{after}"
    );
}

/// Connects from F and sends nothing; returns once spliced closed (the client's address).
fn silent_from(lab: &Lab, to: SocketAddr) -> (SocketAddr, String) {
    lab.run_in(F, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10)).unwrap();
        set_timeouts(&s, Duration::from_secs(10));
        let local = s.local_addr().unwrap();
        let mut back = Vec::new();
        let end = s.read_to_end(&mut back);
        let timed_out =
            |e: &std::io::Error| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
        assert!(!end.as_ref().is_err_and(timed_out), "not closed: {end:?}");
        (local, String::new())
    })
}

/// `spliced check` lists a route's `accept_proxy`; a bad prefix is an error at its column.
#[test]
fn check_lists_accept_proxy() {
    let dir = TempDir::new();
    let good = dir.write_file(
        "good.toml",
        "[[route]]\nname = \"web\"\nlisten = \"[::]:443\"\nupstream = \"[::1]:8443\"\n\
         accept_proxy = [\"198.51.100.0/24\", \"2001:db8::/32\"]\n",
    );
    let out = tests::run(&["check", "--config", &good]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(
            "  accept_proxy 198.51.100.0/24, 2001:db8::/32: a PROXY v1/v2 header required from \
             these sources within 5s"
        ),
        "{}",
        out.stdout
    );
    let bad = dir.write_file(
        "bad.toml",
        "[[route]]\nname = \"web\"\nlisten = \"[::]:443\"\nupstream = \"[::1]:8443\"\n\
         accept_proxy = [\"198.51.100.0/24\", \"198.51.100.7/24\"]\n",
    );
    let out = tests::run(&["check", "--config", &bad]);
    assert_eq!(out.code, Some(64), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("bad.toml:5:36: route[0].accept_proxy: 198.51.100.7/24 has bits set"),
        "{}",
        out.stderr
    );
}
