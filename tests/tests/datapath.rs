//! The data paths' semantics: every byte arrives once and in order, half-close is carried both
//! ways, resets and refusals end the other side promptly.
//!
//! - Per data path (sockmap, splice, copy, via [`per_mode!`]): bulk transfers (upload, download,
//!   both at once, and a download after the client's FIN) with SHA-256 compared at both ends; a
//!   half-close exchange; a server that speaks first; a client that speaks first; 300 instant
//!   half-close exchanges (on sockmap many reach the daemon in CLOSE_WAIT and take the userspace
//!   fallback); 2,000 short connections the upstream closes first; 200 concurrent connections; an upstream reset; a refused upstream; TCP urgent data both ways.
//! - Once, in mode auto (sockmap where the kernel has it): how the upstream is named (zone by
//!   interface name and by index, a host name, IPv4), and a veth re-created under a running
//!   daemon, which must look the zone name up again at the next dial.
//!
//! Every socket has timeouts and every loop is bounded, so a broken data path fails, not hangs.
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use tests::{
    accept, assert_closed_on_connect, bytes, closed_lines, closed_within, exchange,
    half_close_exchange, per_mode, read_exact, receive, reset, set_timeouts, Forward, Payload,
    Spliced, Topology,
};

/// Size of each direction of the bulk transfers (tests named `_256mib`); the VM suite scales it
/// down with `SPLICED_TEST_BULK_MIB`.
fn bulk() -> u64 {
    tests::bulk_bytes(256 << 20)
}
/// How long a bulk transfer may take (the sockets' own timeouts are 60 s per call).
const BULK_LIMIT: Duration = Duration::from_secs(60);
/// How long the upstream may wait for the daemon's dial.
const ACCEPT: Duration = Duration::from_secs(10);
/// Read/write timeout of the sockets of small exchanges.
const IO: Duration = Duration::from_secs(10);
/// How long the daemon may take to log a connection's end.
const LOG: Duration = Duration::from_secs(10);
/// How soon the client must see the end of a connection whose upstream reset or refused.
const PROMPT: Duration = Duration::from_secs(2);

/// When one end of a bulk transfer sends its FIN.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fin {
    /// As soon as its own bytes are sent, while still reading.
    AfterSending,
    /// Only once it has read the other end's EOF, as a plain sink does.
    AfterEof,
}

/// One end of a bulk transfer: sends `len` bytes (seed `seed`) while reading to EOF, FIN as
/// `fin` says. Returns ((bytes received, their SHA-256), SHA-256 sent).
fn bulk_end(s: &mut TcpStream, len: u64, seed: u64, fin: Fin) -> ((u64, [u8; 32]), [u8; 32]) {
    let mut tx = s.try_clone().unwrap();
    thread::scope(|t| {
        let sender = t.spawn(move || {
            let sent = Payload::new(len, seed).send(&mut tx).unwrap();
            if let Fin::AfterSending = fin {
                tx.shutdown(Shutdown::Write).unwrap();
            }
            sent
        });
        let received = receive(s).unwrap();
        let sent = sender.join().unwrap();
        if let Fin::AfterEof = fin {
            s.shutdown(Shutdown::Write).unwrap();
        }
        (received, sent)
    })
}

/// Moves `up` bytes client to upstream and `down` bytes back, at the same time, each end sending
/// its FIN as given, and compares counts and SHA-256 at both ends.
fn transfer(mode: &str, (up, client_fin): (u64, Fin), (down, server_fin): (u64, Fin)) {
    let Some(s) = Forward::start(mode, &[]) else {
        return;
    };
    let started = Instant::now();
    let mut client = s.spliced.connect();
    let (client_end, server_end) = thread::scope(|t| {
        let server = t.spawn(|| bulk_end(&mut accept(&s.listener, ACCEPT), down, 2, server_fin));
        let client_end = bulk_end(&mut client, up, 1, client_fin);
        (client_end, server.join().unwrap())
    });
    let took = started.elapsed();
    let ((got_up, hash_up), sent_down) = server_end;
    let ((got_down, hash_down), sent_up) = client_end;
    assert_eq!(got_up, up, "bytes received upstream");
    assert_eq!(hash_up, sent_up, "SHA-256 client -> upstream differs");
    assert_eq!(got_down, down, "bytes received by the client");
    assert_eq!(hash_down, sent_down, "SHA-256 upstream -> client differs");
    assert!(took < BULK_LIMIT, "{mode}: transfer took {took:?}");
    eprintln!("{mode}: {up} bytes up and {down} down in {took:?}");
    s.spliced.assert_closed(0, None, up, down);
    let early_fin = (up == 0 && client_fin == Fin::AfterSending)
        || (down == 0 && server_fin == Fin::AfterSending);
    // Full-size transfers only: scaled down (the QEMU guests, 8 MiB under TCG) the daemon can
    // be so slow that the move waits for a read that empties the queue until the sender's FIN
    // is near, and the FIN lands before it (it stays on copy); every byte is still checked
    // above.
    if mode == "auto"
        && !early_fin
        && up.max(down) >= 256 << 20
        && s.spliced.log().contains("data path sockmap")
    {
        // Started on the copy path, moved on after the first 256 KiB: a download (to the
        // client on loopback) to sockmap, an upload (to the upstream behind the veth) to
        // splice, where each was measured faster and cheaper per GB (forward/bulk.rs). (A
        // connection half-closed before that stays on the copy path.)
        // The same amount both ways has no larger share: the pick follows whichever count was
        // ahead at the move, or the turns the two pumps' reads took (then sockmap, as for
        // many small messages); either way it left the copy path.
        let log = s.spliced.log();
        let line = closed_lines(&log)[0];
        let expected: &[&str] = match down.cmp(&up) {
            std::cmp::Ordering::Greater => &["path=sockmap"],
            std::cmp::Ordering::Less => &["path=splice"],
            std::cmp::Ordering::Equal => &["path=sockmap", "path=splice"],
        };
        assert!(
            expected.iter().any(|p| line.contains(p)),
            "not moved to {expected:?}: {line}"
        );
    }
}

fn upload(mode: &str) {
    transfer(mode, (bulk(), Fin::AfterSending), (0, Fin::AfterEof));
}
per_mode!(upload_256mib, super::upload, and_auto);

fn download(mode: &str) {
    transfer(mode, (0, Fin::AfterEof), (bulk(), Fin::AfterSending));
}
per_mode!(download_256mib, super::download, and_auto);

fn bidirectional(mode: &str) {
    transfer(
        mode,
        (bulk(), Fin::AfterSending),
        (bulk(), Fin::AfterSending),
    );
}
per_mode!(both_ways_256mib, super::bidirectional, and_auto);

/// The client half-closes at once, then downloads (a request ended by SHUT_WR, a large reply).
fn download_after_fin(mode: &str) {
    transfer(mode, (0, Fin::AfterSending), (bulk(), Fin::AfterSending));
}
per_mode!(
    download_after_client_fin_256mib,
    super::download_after_fin,
    and_auto
);

/// The client sends and SHUT_WRs; the server reads to EOF, only then replies and closes.
fn half_close(mode: &str) {
    let Some(s) = Forward::start(mode, &[]) else {
        return;
    };
    let (mut c, mut srv) = s.pair(IO);
    let (req, reply) = (bytes(16 << 10, 3), bytes(32 << 10, 4));
    half_close_exchange(&mut c, &mut srv, &req, &reply);
    s.spliced
        .assert_closed(0, None, req.len() as u64, reply.len() as u64);
}
per_mode!(half_close, super::half_close, and_auto);

/// The server reads `req` (already sent) and replies; then both sides close and each sees a
/// clean EOF.
fn reply_and_close(c: &mut TcpStream, srv: &mut TcpStream, req: &[u8], reply: &[u8]) {
    assert_eq!(read_exact(srv, req.len()), req, "request");
    srv.write_all(reply).unwrap();
    assert_eq!(read_exact(c, reply.len()), reply, "reply");
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(receive(srv).unwrap().0, 0, "bytes after the request");
    srv.shutdown(Shutdown::Write).unwrap();
    assert_eq!(receive(c).unwrap().0, 0, "bytes after the reply");
}

/// The upstream sends a banner the client reads before sending anything.
fn server_first(mode: &str) {
    const BANNER: &[u8] = b"220 spliced-test ESMTP ready\r\n";
    let Some(s) = Forward::start(mode, &[]) else {
        return;
    };
    let (mut c, mut srv) = s.pair(IO);
    srv.write_all(BANNER).unwrap();
    assert_eq!(read_exact(&mut c, BANNER.len()), BANNER, "banner");
    let (req, reply) = (b"EHLO client\r\n", b"250 hello client\r\n");
    c.write_all(req).unwrap();
    reply_and_close(&mut c, &mut srv, req, reply);
    s.spliced.assert_closed(
        0,
        None,
        req.len() as u64,
        (BANNER.len() + reply.len()) as u64,
    );
}
per_mode!(server_speaks_first, super::server_first, and_auto);

/// The client writes its request at once after connect, before the upstream accepts.
fn client_first(mode: &str) {
    let Some(s) = Forward::start(mode, &[]) else {
        return;
    };
    let req = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n";
    let mut c = s.connect(IO);
    c.write_all(req).unwrap();
    let mut srv = s.accept(IO);
    let reply = bytes(4096, 5);
    reply_and_close(&mut c, &mut srv, req, &reply);
    s.spliced
        .assert_closed(0, None, req.len() as u64, reply.len() as u64);
}
per_mode!(client_speaks_first, super::client_first, and_auto);

/// `send(2)` with `flags`, all of `bytes` in one call.
fn send_flags(s: &TcpStream, bytes: &[u8], flags: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: `bytes` is valid for reads of its length.
    let n = unsafe { libc::send(s.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), flags) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "send: {}",
        std::io::Error::last_os_error()
    );
}

/// Up to `n` bytes, fewer if the socket's read timeout passes first.
fn read_up_to(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < n {
        match s.read(&mut buf[..n - got.len()]) {
            Ok(0) | Err(_) => break,
            Ok(k) => got.extend_from_slice(&buf[..k]),
        }
    }
    got
}

/// TCP urgent data (`MSG_OOB`, telnet's and FTP's "synch") both ways: the urgent byte arrives in
/// line, and so does everything after it (splice stopped at the urgent mark for good; copy
/// dropped the byte).
fn urgent_data(mode: &str) {
    let Some(s) = Forward::start(mode, &[]) else {
        return;
    };
    let (mut c, mut srv) = s.pair(IO);
    let (c_send, srv_send) = (c.try_clone().unwrap(), srv.try_clone().unwrap());
    for (from, to, tag) in [
        (&c_send, &mut srv, "client's"),
        (&srv_send, &mut c, "upstream's"),
    ] {
        send_flags(from, b"hello", 0);
        let got = read_up_to(to, 5);
        assert!(got == b"hello", "{tag} first bytes: got {got:?}");
        send_flags(from, b"ab", libc::MSG_OOB);
        send_flags(from, b"cdef", 0);
        let got = read_up_to(to, 6);
        assert!(
            got == b"abcdef",
            "{tag} urgent byte and the bytes after it: got {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    c.write_all(b"end").unwrap();
    reply_and_close(&mut c, &mut srv, b"end", b"done");
    s.spliced.assert_closed(0, None, 11 + 3, 11 + 4);
}
per_mode!(urgent_data_both_ways, super::urgent_data, and_auto);

/// `auto` with sockmap: a connection that moved a few bytes ends on the copy path; one that lives
/// past 100 ms is moved to sockmap at a quiet moment, and what it carried on both paths counts.
#[test]
fn auto_promotes_by_age() {
    let Some(s) = Forward::start("auto", &[]) else {
        return;
    };
    if !s.spliced.log().contains("data path sockmap") {
        assert!(!tests::ebpf_required(), "auto did not choose sockmap");
        return;
    }
    let (mut c, mut srv) = s.pair(IO);
    let (req, reply) = (b"short", b"reply");
    exchange(&mut c, &mut srv, req, reply);
    thread::sleep(Duration::from_millis(400));
    let (req2, reply2) = (bytes(100_000, 7), bytes(200_000, 8));
    half_close_exchange(&mut c, &mut srv, &req2, &reply2);
    let log = s.spliced.wait_log("connection closed", 1, LOG);
    let line = closed_lines(&log)[0];
    assert!(
        line.contains("path=sockmap"),
        "not promoted after 400 ms: {line}"
    );
    s.spliced.assert_closed(
        0,
        None,
        (req.len() + req2.len()) as u64,
        (reply.len() + reply2.len()) as u64,
    );
    // And a connection over in a moment stays on the copy path.
    let (mut c, mut srv) = s.pair(IO);
    half_close_exchange(&mut c, &mut srv, b"quick", b"done");
    let log = s.spliced.wait_log("connection closed", 2, LOG);
    let line = closed_lines(&log)[1];
    assert!(
        line.contains("path=copy") && line.contains("bytes_up=5 bytes_down=4 "),
        "{line}"
    );
}

/// The server's reply to `req`.
fn reply_to(req: &[u8]) -> Vec<u8> {
    [b"reply to ".as_slice(), req].concat()
}

/// Runs `client(i)` for each `i` below `n`, on `threads` threads at once.
fn in_parallel(n: usize, threads: usize, client: impl Fn(usize) + Sync) {
    let next = AtomicUsize::new(0);
    thread::scope(|t| {
        for _ in 0..threads {
            t.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                client(i);
            });
        }
    });
}

/// Connections in the instant half-close case, and the clients making them at once.
const INSTANT: usize = 300;
const INSTANT_CLIENTS: usize = 4;

/// Connect, a short request, SHUT_WR at once, the reply to EOF: 300 times, 4 at a time.
fn instant_half_close(mode: &str) {
    let Some(s) = Forward::start(mode, &[]) else {
        return;
    };
    thread::scope(|t| {
        t.spawn(|| {
            for _ in 0..INSTANT {
                let mut srv = s.accept(IO);
                let mut req = Vec::new();
                srv.read_to_end(&mut req).unwrap();
                srv.write_all(&reply_to(&req)).unwrap();
            }
        });
        in_parallel(INSTANT, INSTANT_CLIENTS, |i| {
            let req = format!("request {i}").into_bytes();
            let mut c = s.connect(IO);
            c.write_all(&req).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            assert_eq!(got, reply_to(&req), "exchange {i}");
        });
    });
    let log = s.spliced.wait_log("end=complete", INSTANT, LOG);
    let count = |path: &str| log.lines().filter(|l| l.contains(path)).count();
    eprintln!(
        "{mode}: {INSTANT} exchanges: path=sockmap {}, path=splice {}, path=copy {}",
        count("path=sockmap"),
        count("path=splice"),
        count("path=copy")
    );
}
per_mode!(instant_half_close_300, super::instant_half_close, and_auto);

/// Connections in the upstream-closes-first case, and the clients making them at once.
const SHORT: usize = 2000;
const SHORT_CLIENTS: usize = 4;
const SHORT_LEN: usize = 100;

/// The short-connection pattern of the bench, 2,000 times, 4 at a time: the upstream greets on
/// accept, the client sends 100 bytes at once, the upstream echoes them and closes first, the
/// client reads to EOF and closes. On sockmap the upstream's FIN often arrives while the
/// client's bytes are still in the upstream socket's backlog: a verdict that passed the FIN's
/// zero-length skb into that backlog broke the socket (EPIPE) and reset about 1 connection in
/// 1,000 (sockmap.md, trap 1).
fn upstream_closes_first(mode: &str) {
    let Some(s) = Forward::start(mode, &[]) else {
        return;
    };
    thread::scope(|t| {
        t.spawn(|| {
            // Each connection served on its own thread, as a real server would: the reply and
            // FIN race the client's bytes through the daemon.
            for _ in 0..SHORT {
                let mut srv = s.accept(IO);
                t.spawn(move || {
                    srv.set_nodelay(true).unwrap();
                    srv.write_all(b"g").unwrap();
                    let mut req = [0u8; SHORT_LEN];
                    srv.read_exact(&mut req).unwrap();
                    srv.write_all(&req).unwrap();
                });
            }
        });
        in_parallel(SHORT, SHORT_CLIENTS, |i| {
            let req = bytes(SHORT_LEN as u64, i as u64);
            let mut c = s.connect(IO);
            c.set_nodelay(true).unwrap();
            c.write_all(&req).unwrap();
            let mut got = Vec::new();
            if let Err(e) = c.read_to_end(&mut got) {
                panic!("connection {i}: {e} after {} bytes", got.len());
            }
            assert_eq!(got.len(), SHORT_LEN + 1, "connection {i}: reply length");
            assert!(
                got[0] == b'g' && got[1..] == req,
                "connection {i}: reply differs"
            );
        });
    });
    let log = s.spliced.wait_log("connection closed", SHORT, LOG);
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection closed") && !l.contains("end=complete"))
        .collect();
    assert!(bad.is_empty(), "{} not complete: {bad:#?}", bad.len());
}
per_mode!(
    upstream_closes_first_2000,
    super::upstream_closes_first,
    and_auto
);

/// Connections open at once in the concurrent case.
const CONCURRENT: usize = 200;

/// How the server transforms what it received into its reply.
fn mirror(req: &[u8]) -> Vec<u8> {
    req.iter().rev().map(|b| b ^ 0x5a).collect()
}

/// 200 connections open at once, each moving a distinct payload both ways.
fn concurrent(mode: &str) {
    let Some(s) = Forward::start(mode, &[]) else {
        return;
    };
    // All connected before any byte moves: 200 live connections at the same time.
    let clients: Vec<TcpStream> = (0..CONCURRENT).map(|_| s.connect(IO)).collect();
    thread::scope(|t| {
        t.spawn(|| {
            for _ in 0..CONCURRENT {
                let mut srv = s.accept(IO);
                t.spawn(move || {
                    let mut req = Vec::new();
                    srv.read_to_end(&mut req).unwrap();
                    srv.write_all(&mirror(&req)).unwrap();
                });
            }
        });
        for (i, mut c) in clients.into_iter().enumerate() {
            t.spawn(move || {
                let req = bytes(1000 + 37 * i as u64, 100 + i as u64);
                c.write_all(&req).unwrap();
                c.shutdown(Shutdown::Write).unwrap();
                let mut got = Vec::new();
                c.read_to_end(&mut got).unwrap();
                assert_eq!(got.len(), req.len(), "connection {i}: reply length");
                assert!(got == mirror(&req), "connection {i}: reply differs");
            });
        }
    });
    s.spliced.wait_log("end=complete", CONCURRENT, LOG);
}
per_mode!(concurrent_200, super::concurrent, and_auto);

/// After bytes flowed both ways the upstream resets; the client sees the end within 2 s.
fn upstream_reset(mode: &str) {
    let Some(s) = Forward::start(mode, &[]) else {
        return;
    };
    let (mut c, mut srv) = s.pair(IO);
    exchange(&mut c, &mut srv, b"hello", b"world");
    reset(srv);
    let took = closed_within(&mut c, PROMPT);
    eprintln!("{mode}: client saw the upstream's reset after {took:?}");
    let log = s.spliced.wait_log("connection closed", 1, LOG);
    assert!(
        log.lines()
            .any(|l| l.contains("connection closed") && l.contains("end=upstream failed")),
        "the daemon did not log the upstream's failure:\n{log}"
    );
}
per_mode!(upstream_reset, super::upstream_reset, and_auto);

/// The upstream port has no listener: the client is closed at once and the daemon says why.
fn upstream_refused(mode: &str) {
    let topo = Topology::new();
    // Bound, then closed: nothing listens on that port in the namespace.
    let port = topo.listen().local_addr().unwrap().port();
    let Some(spliced) = Spliced::route(mode, &topo.upstream(port), &[]) else {
        return;
    };
    let started = Instant::now();
    // Not Spliced::connect: the reset can come before connect_timeout has polled the socket.
    assert_closed_on_connect(spliced.addr(), PROMPT);
    let took = started.elapsed();
    assert!(took < PROMPT, "client closed only after {took:?}");
    eprintln!("{mode}: client closed {took:?} after a refused dial");
    spliced.wait_log("upstream failed", 1, LOG);
}
per_mode!(upstream_refused, super::upstream_refused, and_auto);

/// A half-close exchange through `spliced` to `listener`, tagged so each one is distinct.
/// Returns the bytes moved (up, down).
fn tagged_exchange(spliced: &Spliced, listener: &TcpListener, tag: &str) -> (u64, u64) {
    let mut c = spliced.connect();
    set_timeouts(&c, IO);
    let mut srv = accept(listener, ACCEPT);
    set_timeouts(&srv, IO);
    let req = format!("request {tag}").into_bytes();
    let reply = reply_to(&req);
    half_close_exchange(&mut c, &mut srv, &req, &reply);
    (req.len() as u64, reply.len() as u64)
}

/// A daemon in mode auto (sockmap where the kernel has it) forwarding to `upstream`.
fn auto(upstream: &str) -> Spliced {
    Spliced::route("auto", upstream, &[]).expect("mode auto always starts")
}

#[test]
fn zone_by_name() {
    let topo = Topology::new();
    let listener = topo.listen();
    let port = listener.local_addr().unwrap().port();
    let spliced = auto(&format!("[fe80::2%{}]:{port}", topo.host_if));
    let (up, down) = tagged_exchange(&spliced, &listener, "zone by name");
    spliced.assert_closed(0, None, up, down);
}

#[test]
fn zone_by_index() {
    let topo = Topology::new();
    let listener = topo.listen();
    let port = listener.local_addr().unwrap().port();
    let spliced = auto(&format!("[fe80::2%{}]:{port}", topo.host_if_index()));
    let (up, down) = tagged_exchange(&spliced, &listener, "zone by index");
    spliced.assert_closed(0, None, up, down);
}

#[test]
fn hostname_upstream() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let spliced = auto(&format!("localhost:{port}"));
    let (up, down) = tagged_exchange(&spliced, &listener, "localhost");
    spliced.assert_closed(0, None, up, down);
}

#[test]
fn ipv4_upstream() {
    let topo = Topology::new();
    let listener = topo.listen();
    let port = listener.local_addr().unwrap().port();
    let spliced = auto(&format!("{}:{port}", topo.ipv4().1));
    let (up, down) = tagged_exchange(&spliced, &listener, "ipv4");
    spliced.assert_closed(0, None, up, down);
}

/// The veth is deleted and re-created (same name, new index) under a running daemon: the next
/// dial looks the zone's name up again.
#[test]
fn veth_recreated() {
    let topo = Topology::new();
    // Bound to [::] in the namespace: it outlives the veth.
    let listener = topo.listen();
    let port = listener.local_addr().unwrap().port();
    let spliced = auto(&topo.upstream(port));
    let (up, down) = tagged_exchange(&spliced, &listener, "before");
    spliced.assert_closed(0, None, up, down);
    let old_index = topo.host_if_index();
    topo.delete_veth();
    topo.add_veth();
    assert_ne!(
        topo.host_if_index(),
        old_index,
        "the re-created veth kept its index"
    );
    tagged_exchange(&spliced, &listener, "after");
    spliced.wait_log("end=complete", 2, LOG);
}
