//! Routing matches under SIGHUP (issue 12, "Reload adds, removes and reorders matches for new
//! connections; live ones keep theirs"), per data path:
//!
//! - Two HTTP upstreams in a namespace, each answering with its name, and an echo upstream for
//!   one live connection held open across every reload.
//! - Matches reordered (a wildcard moved in front of an exact name): new connections for the
//!   exact name now reach the wildcard's upstream.
//! - A match removed (the live connection's own) and one added: new connections follow the new
//!   table, and the live connection still echoes through the upstream it was routed to.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use tests::{accept, free_port, hup, per_mode, set_timeouts, Spliced, TempDir, Topology};

/// How long an upstream keeps accepting; every test here ends well inside it.
const UPSTREAM_LIFE: Duration = Duration::from_secs(60);

/// An HTTP upstream in the namespace that answers every request with `name` and closes, until
/// [`UPSTREAM_LIFE`] has passed (its thread is left to end on its own: accept times out).
fn named_upstream(topo: &Topology, name: &'static str) -> String {
    let listener = topo.listen();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || serve_named(&listener, name));
    topo.upstream(port)
}

fn serve_named(listener: &TcpListener, name: &str) {
    let start = Instant::now();
    while let Some(left) = UPSTREAM_LIFE.checked_sub(start.elapsed()) {
        let Ok(mut s) = accept_within(listener, left) else {
            return;
        };
        set_timeouts(&s, Duration::from_secs(10));
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
            match s.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
            name.len()
        );
        let _ = s.write_all(reply.as_bytes());
    }
}

/// `accept` with a limit that returns an error instead of panicking when nobody comes.
fn accept_within(listener: &TcpListener, limit: Duration) -> std::io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// An upstream for one connection that echoes every byte until EOF.
fn echo_upstream(topo: &Topology) -> String {
    let listener = topo.listen();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        let mut s = accept(&listener, Duration::from_secs(20));
        set_timeouts(&s, UPSTREAM_LIFE);
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = s.read(&mut buf) {
            if s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    topo.upstream(port)
}

/// One HTTP request for `host`; the whole answer.
fn answer(addr: SocketAddr, host: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    set_timeouts(&s, Duration::from_secs(10));
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    got
}

/// The body of a 200 answer for `host`: the name of the upstream that answered.
fn get(addr: SocketAddr, host: &str) -> String {
    let got = answer(addr, host);
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{host}: {got:?}");
    got.rsplit("\r\n\r\n").next().unwrap_or_default().to_owned()
}

/// Writes `line` on the live connection and asserts it comes back whole.
fn echoes(live: &mut TcpStream, line: &str) {
    live.write_all(line.as_bytes()).unwrap();
    let mut back = vec![0u8; line.len()];
    live.read_exact(&mut back)
        .expect("the live connection echoes");
    assert_eq!(String::from_utf8_lossy(&back), line);
}

/// The configuration: one route on `port` with `matches` (TOML `[[route.match]]` tables).
fn write(dir: &TempDir, mode: &str, port: u16, matches: &str) -> String {
    let text = format!(
        "mode = \"{mode}\"\ncontrol_socket = \"{}\"\n\n[[route]]\nname = \"web\"\n\
         listen = \"127.0.0.1:{port}\"\n\n{matches}",
        dir.socket()
    );
    dir.write_file("spliced.toml", &text)
}

fn reorder_remove_add(mode: &str) {
    let topo = Topology::new();
    let dir = TempDir::new();
    let (blog, wiki) = (named_upstream(&topo, "blog"), named_upstream(&topo, "wiki"));
    let echo = echo_upstream(&topo);
    let port = free_port();
    let m = |host: &str, up: &str| {
        format!("[[route.match]]\nhost = [\"{host}\"]\nupstream = \"{up}\"\n\n")
    };
    let exact_first =
        m("live.example.com", &echo) + &m("a.example.com", &blog) + &m("*.example.com", &wiki);
    let config = write(&dir, mode, port, &exact_first);
    let Some(spliced) = Spliced::start_mode(mode, &["--config", &config], 1) else {
        return;
    };
    let addr = spliced.addr();
    assert_eq!(addr.port(), port);

    // The live connection: routed to the echo upstream by its Host, then held open.
    let mut live = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    set_timeouts(&live, Duration::from_secs(10));
    echoes(
        &mut live,
        "GET / HTTP/1.1\r\nHost: live.example.com\r\n\r\n",
    );
    assert_eq!(get(addr, "a.example.com"), "blog");
    assert_eq!(get(addr, "b.example.com"), "wiki");

    // Reordered: the wildcard first now takes a.example.com too.
    let wildcard_first =
        m("live.example.com", &echo) + &m("*.example.com", &wiki) + &m("a.example.com", &blog);
    write(&dir, mode, port, &wildcard_first);
    hup(&spliced, "reload: configuration applied", 1);
    assert_eq!(get(addr, "a.example.com"), "wiki", "reordered matches");
    echoes(&mut live, "after the reorder\n");

    // Removed (the live connection's match and the wildcard) and added (c.example.com).
    let changed = m("a.example.com", &blog) + &m("c.example.com", &wiki);
    write(&dir, mode, port, &changed);
    hup(&spliced, "reload: configuration applied", 2);
    assert_eq!(get(addr, "a.example.com"), "blog", "the exact match again");
    assert_eq!(get(addr, "c.example.com"), "wiki", "the added match");
    let unrouted = answer(addr, "b.example.com");
    assert!(unrouted.contains("421 Misdirected Request"), "{unrouted:?}");
    let log = spliced.wait_log("no route for this connection", 1, Duration::from_secs(10));
    assert!(log.contains("host=b.example.com"), "{log}");
    echoes(&mut live, "after the removal\n");
    let log = spliced.log();
    assert!(!log.contains("panicked"), "{log}");
}
per_mode!(
    reload_reorders_removes_and_adds_matches,
    super::reorder_remove_add,
    and_auto
);
