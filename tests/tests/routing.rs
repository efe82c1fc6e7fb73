//! Routing by what the client sends first (issue 12): the TLS server name and ALPN, the HTTP
//! Host, or neither; real TLS servers (`openssl s_server`) and real clients (`openssl s_client`,
//! curl) in a namespace, per data path.
//!
//! - Each name reaches its upstream: the certificate the client sees is that upstream's.
//! - A ClientHello sent one byte per segment, one split over several TLS records, one over
//!   1,500 bytes: the upstream receives exactly the bytes sent (SHA-256), then 1 MiB more.
//! - Host routing with curl, a wildcard, no match with a default and without one (421, TLS
//!   unrecognized_name), a silent client going to the default after `peek_timeout`, an SSH-like
//!   client with `protocol = "other"`.
//! - Garbage, a 1 MiB ClientHello claim, half a record then a close: closed, counted, and the
//!   daemon carries the next connection.
use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use tests::{accept, per_mode, set_timeouts, Spliced, Topology};

const OPENSSL_LARGE: &[u8] = include_bytes!("../../proxy-user/src/peek/testdata/openssl-large.bin");

/// A temporary directory for certificates and the configuration, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("spliced-routing-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Dir(path)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_owned()
    }

    /// Writes `spliced.toml` (the mode, a control socket here, then `routes`) and returns the
    /// arguments that start spliced with it.
    fn config(&self, mode: &str, routes: &str) -> Vec<String> {
        let text = format!(
            "mode = \"{mode}\"\ncontrol_socket = \"{}\"\n{routes}",
            self.file("control.sock")
        );
        fs::write(self.file("spliced.toml"), text).unwrap();
        vec!["--config".into(), self.file("spliced.toml")]
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn start(mode: &str, args: &[String]) -> Option<Spliced> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Spliced::start_mode(mode, &args, 1)
}

/// `openssl s_server -www` in the namespace with a self-signed certificate for `cn`, killed on
/// drop.
struct TlsServer {
    child: Child,
    port: u16,
}

impl TlsServer {
    fn start(topo: &Topology, dir: &Dir, cn: &str, port: u16) -> TlsServer {
        let (key, cert) = (
            dir.file(&format!("{cn}.key")),
            dir.file(&format!("{cn}.crt")),
        );
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", &format!("/CN={cn}")])
            .args(["-keyout", &key, "-out", &cert])
            .output()
            .expect("run openssl req");
        assert!(
            out.status.success(),
            "openssl req: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &topo.netns,
                "openssl",
                "s_server",
                "-4",
                "-www",
            ])
            .args(["-accept", &port.to_string(), "-cert", &cert, "-key", &key])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start openssl s_server");
        // It prints ACCEPT once it listens.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("ACCEPT") {
                    let _ = tx.send(());
                }
            }
        });
        let mut server = TlsServer { child, port };
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let _ = server.child.kill();
            panic!("openssl s_server for {cn} did not start within 10 s");
        }
        server.port = port;
        server
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The certificate subject `openssl s_client` sees with `-servername name`, or its error.
fn s_client(addr: SocketAddr, name: &str, alpn: Option<&str>) -> String {
    let mut cmd = Command::new("timeout");
    cmd.args([
        "10",
        "openssl",
        "s_client",
        "-brief",
        "-connect",
        &addr.to_string(),
    ])
    .args(["-servername", name]);
    if let Some(alpn) = alpn {
        cmd.args(["-alpn", alpn]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// curl's verbose output and body for `url`, resolved to `addr`.
fn curl(addr: SocketAddr, host: &str, url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sSvk", "--max-time", "10", "--resolve"])
        .arg(format!("{host}:{}:{}", addr.port(), addr.ip()))
        .arg(url)
        .output()
        .expect("run curl");
    // The verbose lines first, the body last.
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
}

/// An HTTP server in the namespace answering every request with `body`, for `count` requests.
fn http_upstream(
    topo: &Topology,
    body: &'static str,
    count: usize,
) -> (String, thread::JoinHandle<()>) {
    let listener = topo.listen();
    let port = listener.local_addr().unwrap().port();
    let handle = thread::spawn(move || {
        for _ in 0..count {
            let mut s = accept(&listener, Duration::from_secs(20));
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(reply.as_bytes());
        }
    });
    (topo.upstream(port), handle)
}

/// A raw upstream that hashes everything it receives until EOF, for `count` connections.
fn sink_upstream(topo: &Topology, count: usize) -> (String, mpsc::Receiver<(u64, [u8; 32])>) {
    let listener = topo.listen();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for _ in 0..count {
            let mut s = accept(&listener, Duration::from_secs(20));
            let mut hash = Sha256::new();
            let mut total = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        hash.update(&buf[..n]);
                        total += n as u64;
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Write);
            let _ = tx.send((total, hash.finalize().into()));
        }
    });
    (topo.upstream(port), rx)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to spliced");
    set_timeouts(&s, Duration::from_secs(20));
    s
}

fn tls_by_name(mode: &str) {
    let topo = Topology::new();
    let dir = Dir::new();
    let a = TlsServer::start(&topo, &dir, "a.example.com", 4431);
    let b = TlsServer::start(&topo, &dir, "b.example.org", 4432);
    let git = TlsServer::start(&topo, &dir, "git.example.com", 4433);
    let (_, v4) = topo.ipv4();
    let routes = format!(
        r#"[[route]]
name = "web"
listen = "127.0.0.1:0"

[[route.match]]
sni = ["a.example.com"]
upstream = "{v4}:{}"

[[route.match]]
sni = ["git.example.com"]
alpn = ["h2"]
upstream = "{v4}:{}"

[[route.match]]
sni = ["*.example.org", "git.example.com"]
upstream = "{v4}:{}"
"#,
        a.port, git.port, b.port
    );
    let Some(spliced) = start(mode, &dir.config(mode, &routes)) else {
        return;
    };
    let addr = spliced.addr();
    let seen = s_client(addr, "A.Example.COM.", None);
    assert!(seen.contains("CN = a.example.com"), "{seen}");
    let seen = s_client(addr, "x.y.example.org", None);
    assert!(seen.contains("CN = b.example.org"), "{seen}");
    // ALPN decides between the two git matches.
    let seen = s_client(addr, "git.example.com", Some("h2,http/1.1"));
    assert!(seen.contains("CN = git.example.com"), "{seen}");
    let seen = s_client(addr, "git.example.com", Some("http/1.1"));
    assert!(seen.contains("CN = b.example.org"), "{seen}");
    let seen = curl(
        addr,
        "www.example.org",
        &format!("https://www.example.org:{}/", addr.port()),
    );
    assert!(
        seen.contains("CN=b.example.org") && seen.contains("200 ok"),
        "{seen}"
    );
    // No match and no default: a TLS alert naming the problem.
    let seen = s_client(addr, "nothing.example.net", None);
    assert!(seen.contains("unrecognized name"), "{seen}");
    let log = spliced.wait_log("connection closed", 5, Duration::from_secs(10));
    assert!(
        log.contains("sni=a.example.com") && log.contains("rule=match[0]"),
        "{log}"
    );
    let log = spliced.wait_log("no route for this connection", 1, Duration::from_secs(10));
    assert!(log.contains("sni=nothing.example.net"), "{log}");
}
per_mode!(tls_routes_by_server_name, super::tls_by_name, and_auto);

/// A route whose only match is a wildcard, to a sink that hashes what it gets.
fn sink_route(mode: &str, dir: &Dir, upstream: &str) -> Vec<String> {
    let routes = format!(
        "[[route]]\nname = \"sink\"\nlisten = \"127.0.0.1:0\"\n\n\
         [[route.match]]\nsni = [\"*.example.com\"]\nupstream = \"{upstream}\"\n"
    );
    dir.config(mode, &routes)
}

/// The handshake message inside a capture's records.
fn handshake_of(capture: &[u8]) -> Vec<u8> {
    let mut message = Vec::new();
    let mut rest = capture;
    while rest.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        message.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
    message
}

fn client_hello_intact(mode: &str) {
    let topo = Topology::new();
    let dir = Dir::new();
    let (upstream, received) = sink_upstream(&topo, 3);
    let Some(spliced) = start(mode, &sink_route(mode, &dir, &upstream)) else {
        return;
    };
    let mut split = Vec::new();
    for chunk in handshake_of(OPENSSL_LARGE).chunks(300) {
        split.extend_from_slice(&[22, 3, 1]);
        split.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        split.extend_from_slice(chunk);
    }
    let bulk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i * 7 + i / 4096) as u8)
        .collect();
    for (how, hello, per_byte) in [
        ("one byte per segment", OPENSSL_LARGE.to_vec(), true),
        ("several records", split, false),
        ("one write over 1,500 bytes", OPENSSL_LARGE.to_vec(), false),
    ] {
        assert!(hello.len() > 1500);
        let mut client = connect(spliced.addr());
        client.set_nodelay(true).unwrap();
        if per_byte {
            for b in &hello {
                client.write_all(&[*b]).unwrap();
                thread::sleep(Duration::from_micros(300));
            }
        } else {
            client.write_all(&hello).unwrap();
        }
        client.write_all(&bulk).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest);
        let (len, hash) = received
            .recv_timeout(Duration::from_secs(30))
            .expect("the upstream got it");
        let mut want = Sha256::new();
        want.update(&hello);
        want.update(&bulk);
        assert_eq!(len, (hello.len() + bulk.len()) as u64, "{how}");
        assert_eq!(hash, <[u8; 32]>::from(want.finalize()), "{how}");
    }
    spliced.wait_log("connection closed", 3, Duration::from_secs(10));
}
per_mode!(
    client_hello_arrives_intact,
    super::client_hello_intact,
    and_auto
);

fn http_by_host(mode: &str) {
    let topo = Topology::new();
    let dir = Dir::new();
    let (blog, _b) = http_upstream(&topo, "blog", 2);
    let (wiki, _w) = http_upstream(&topo, "wiki", 1);
    let routes = format!(
        r#"[[route]]
name = "plain"
listen = "127.0.0.1:0"

[[route.match]]
host = ["blog.example.com"]
upstream = "{blog}"

[[route.match]]
protocol = "http"
host = ["*.wiki.example.com"]
upstream = "{wiki}"
"#
    );
    let Some(spliced) = start(mode, &dir.config(mode, &routes)) else {
        return;
    };
    let addr = spliced.addr();
    let url = |host: &str| format!("http://{host}:{}/", addr.port());
    let seen = curl(addr, "blog.example.com", &url("blog.example.com"));
    assert!(seen.ends_with("blog"), "{seen}");
    let seen = curl(addr, "BLOG.example.com.", &url("BLOG.example.com."));
    assert!(seen.ends_with("blog"), "{seen}");
    let seen = curl(addr, "en.wiki.example.com", &url("en.wiki.example.com"));
    assert!(seen.ends_with("wiki"), "{seen}");
    let seen = curl(addr, "wiki.example.com", &url("wiki.example.com"));
    assert!(seen.contains("421 Misdirected Request"), "{seen}");
    let log = spliced.wait_log("no route for this connection", 1, Duration::from_secs(10));
    assert!(log.contains("host=wiki.example.com"), "{log}");
}
per_mode!(http_routes_by_host, super::http_by_host);

fn defaults_and_other(mode: &str) {
    let topo = Topology::new();
    let dir = Dir::new();
    // The default speaks first, as SSH does; the "other" upstream hashes what it gets.
    let banner = topo.listen();
    let banner_port = banner.local_addr().unwrap().port();
    let (other, received) = sink_upstream(&topo, 1);
    let banner_thread = thread::spawn(move || {
        for _ in 0..2 {
            let mut s = accept(&banner, Duration::from_secs(20));
            let _ = s.write_all(b"SSH-2.0-default\r\n");
            // Until the client closes: closing with its bytes unread would reset it.
            let _ = std::io::copy(&mut s, &mut std::io::sink());
        }
    });
    let routes = format!(
        r#"[[route]]
name = "shared"
listen = "127.0.0.1:0"
upstream = "{}"
peek_timeout = "1s"

[[route.match]]
sni = ["a.example.com"]
upstream = "{}"

[[route.match]]
protocol = "other"
upstream = "{other}"
"#,
        topo.upstream(banner_port),
        topo.upstream(1)
    );
    let Some(spliced) = start(mode, &dir.config(mode, &routes)) else {
        return;
    };
    // Silent: the default after peek_timeout.
    let started = Instant::now();
    let mut client = connect(spliced.addr());
    let mut line = [0u8; 17];
    client.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"SSH-2.0-default\r\n");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "answered after {waited:?}"
    );
    drop(client);
    // An HTTP client no match wants: the default too (not a 421: there is a default).
    let mut client = connect(spliced.addr());
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x.example\r\n\r\n")
        .unwrap();
    client.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"SSH-2.0-default\r\n");
    drop(client);
    // A client-first non-TLS, non-HTTP protocol: protocol = "other".
    let mut client = connect(spliced.addr());
    client.write_all(b"SSH-2.0-client\r\n").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (len, hash) = received.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(len, 16);
    assert_eq!(
        hash,
        <[u8; 32]>::from(Sha256::digest(b"SSH-2.0-client\r\n"))
    );
    banner_thread.join().unwrap();
    let log = spliced.wait_log("connection closed", 3, Duration::from_secs(10));
    assert!(
        log.contains("peek=silent_default") && log.contains("rule=match[1]"),
        "{log}"
    );
}
per_mode!(
    default_upstream_and_other_protocols,
    super::defaults_and_other
);

/// Whether the peer closed `s` (EOF or reset) within 10 s.
fn closed(mut s: TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(0) | Err(_)) && !matches!(s.read(&mut buf), Ok(n) if n > 0)
}

fn hostile_clients(mode: &str) {
    let topo = Topology::new();
    let dir = Dir::new();
    let (upstream, received) = sink_upstream(&topo, 1);
    let Some(mut spliced) = start(mode, &sink_route(mode, &dir, &upstream)) else {
        return;
    };
    let addr = spliced.addr();
    // Garbage: "other", which this route has no match or default for.
    let mut client = connect(addr);
    client
        .write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3])
        .unwrap();
    assert!(closed(client), "garbage");
    // A ClientHello claiming 1 MiB: refused from its first 9 bytes.
    let mut client = connect(addr);
    client
        .write_all(&[22, 3, 1, 0x40, 0, 1, 0x10, 0, 0])
        .unwrap();
    client.write_all(&[0; 4096]).unwrap();
    assert!(closed(client), "1 MiB claim");
    // Half a record, then a close.
    let mut client = connect(addr);
    client.write_all(&OPENSSL_LARGE[..700]).unwrap();
    drop(client);
    spliced.wait_log("peek=closed", 1, Duration::from_secs(10));
    let log = spliced.wait_log("peek=malformed", 1, Duration::from_secs(10));
    assert!(log.contains("peek=no_match"), "{log}");
    // The daemon carries the next connection.
    let mut client = connect(addr);
    client.write_all(OPENSSL_LARGE).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (len, _) = received.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(len, OPENSSL_LARGE.len() as u64);
    spliced.assert_running();
}
per_mode!(hostile_first_bytes, super::hostile_clients);

#[test]
fn check_lists_rules_and_rejects_bad_names() {
    let dir = Dir::new();
    let routes = r#"[[route]]
name = "web"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:9"

[[route.match]]
sni = ["blog.example.com", "*.example.org"]
upstream = "127.0.0.1:10"

[[route.match]]
host = ["blog.example.com"]
upstream = "127.0.0.1:11"
"#;
    let args = dir.config("copy", routes);
    let out = Command::new(tests::spliced_bin())
        .arg("check")
        .args(&args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let first = text
        .find("match[0] sni=blog.example.com,*.example.org")
        .expect(&text);
    let second = text.find("match[1] host=blog.example.com").expect(&text);
    assert!(first < second, "{text}");
    let bad = r#"[[route]]
name = "web"
listen = "127.0.0.1:0"

[[route.match]]
sni = ["192.0.2.7"]
upstream = "127.0.0.1:10"
"#;
    let args = dir.config("copy", bad);
    let out = Command::new(tests::spliced_bin())
        .arg("check")
        .args(&args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(64), "{text}");
    // The line and column of the bad name, and what is wrong with it.
    assert!(
        text.contains("spliced.toml:8:8") && text.contains("IP address"),
        "{text}"
    );
}

/// `proxy_protocol` (issue 13, sending side): the header is the first thing the upstream reads,
/// in the client's family, v2 with the SNI as PP2_TYPE_AUTHORITY; the client's bytes follow
/// intact.
fn proxy_header_first(mode: &str) {
    let topo = Topology::new();
    let dir = Dir::new();
    let (v1_upstream, v1_got) = capture_upstream(&topo);
    let (v2_upstream, v2_got) = capture_upstream(&topo);
    let routes = format!(
        r#"[[route]]
name = "pp"
listen = "127.0.0.1:0"
proxy_protocol = "v2"

[[route.match]]
sni = ["*.example.com"]
upstream = "{v2_upstream}"

[[route.match]]
protocol = "other"
proxy_protocol = "v1"
upstream = "{v1_upstream}"
"#
    );
    let Some(spliced) = start(mode, &dir.config(mode, &routes)) else {
        return;
    };
    let addr = spliced.addr();
    let mut client = connect(addr);
    let local = client.local_addr().unwrap();
    client.write_all(b"hello other\n").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let got = v1_got.recv_timeout(Duration::from_secs(20)).unwrap();
    let want = format!(
        "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\nhello other\n",
        local.port(),
        addr.port()
    );
    assert_eq!(String::from_utf8_lossy(&got), want);
    let mut client = connect(addr);
    client.write_all(OPENSSL_LARGE).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let got = v2_got.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(&got[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(got[12], 0x21, "v2 PROXY");
    assert_eq!(got[13], 0x11, "TCP over IPv4");
    let len = usize::from(u16::from_be_bytes([got[14], got[15]]));
    let tlvs = &got[16 + 12..16 + len];
    assert_eq!(tlvs[0], 2, "PP2_TYPE_AUTHORITY first");
    let n = usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
    assert_eq!(&tlvs[3..3 + n], b"blog.example.com");
    assert_eq!(&got[16 + len..], OPENSSL_LARGE);
}
per_mode!(proxy_header_is_written_first, super::proxy_header_first);

/// An upstream that returns everything one connection sent.
fn capture_upstream(topo: &Topology) -> (String, mpsc::Receiver<Vec<u8>>) {
    let listener = topo.listen();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut s = accept(&listener, Duration::from_secs(20));
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let _ = tx.send(got);
    });
    (topo.upstream(port), rx)
}
