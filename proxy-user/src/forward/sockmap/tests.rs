//! The sockmap path on loopback pairs, without the daemon around it. Needs root and the
//! eBPF object; skipped otherwise, unless CI=true or SPLICED_REQUIRE_EBPF=1.
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener},
    time::Duration,
};

use std::sync::Arc;

use super::*;

pub(super) fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("SPLICED_REQUIRE_EBPF").is_ok_and(|v| v == "1")
}

pub(super) fn load() -> Option<Sockmap> {
    match Sockmap::load(crate::EBPF_OBJECT) {
        Ok(s) => Some(s),
        Err(e) if !required() => {
            eprintln!("skipping: {e}");
            None
        }
        Err(e) => panic!("sockmap unavailable: {e}"),
    }
}

/// (client end, proxy's client socket, proxy's upstream socket, upstream end)
pub(super) fn sockets() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let a = TcpStream::connect(addr).unwrap();
    let (b, _) = l.accept().unwrap();
    let c = TcpStream::connect(addr).unwrap();
    let (d, _) = l.accept().unwrap();
    for s in [&a, &d] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    b.set_nonblocking(true).unwrap();
    c.set_nonblocking(true).unwrap();
    (a, b, c, d)
}

/// Writes `n` bytes of [`pattern`] in 64 KiB writes, then shuts the write side down.
fn send_pattern(s: &mut TcpStream, n: u64) {
    let mut buf = vec![0u8; 65536];
    let mut i = 0u64;
    while i < n {
        for x in buf.iter_mut() {
            *x = pattern(i);
            i += 1;
        }
        s.write_all(&buf).unwrap();
    }
    s.shutdown(Shutdown::Write).unwrap();
}

/// The client's end on a thread of its own: [`send_pattern`] of `n` bytes, then everything
/// the upstream sends back, to EOF.
fn client_sends(mut a: TcpStream, n: u64) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        send_pattern(&mut a, n);
        let mut reply = Vec::new();
        a.read_to_end(&mut reply).unwrap();
        reply
    })
}

/// The upstream's end: reads to EOF, checking every byte against [`pattern`]; returns how
/// many arrived.
fn upstream_receives(d: &mut TcpStream) -> u64 {
    let mut buf = vec![0u8; 65536];
    let mut i = 0u64;
    loop {
        let n = d
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("upstream read after {i} bytes (no FIN?): {e}"));
        if n == 0 {
            return i;
        }
        for &x in &buf[..n] {
            assert_eq!(x, pattern(i), "byte {i} corrupted");
            i += 1;
        }
    }
}

/// `per_direction` bytes per direction from a 64 MiB pool.
pub(super) fn budget(per_direction: u64) -> Budget {
    Budget {
        per_direction,
        pool: Arc::new(Pool::new(64 << 20)),
    }
}

pub(super) fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_both_ways_keeps_every_byte() {
    let Some(sockmap) = load() else { return };
    let (a, b, c, mut d) = sockets();
    const N: u64 = 64 << 20;
    let cancel = CancellationToken::new();
    let budget = budget(4 << 20);
    let proxy = async { run(&sockmap, b, c, Some(16 << 20), &budget, &cancel).await };
    let ends = tokio::task::spawn_blocking(move || {
        let writer = client_sends(a, N);
        let i = upstream_receives(&mut d);
        assert_eq!(i, N, "upstream got {i} of {N} bytes");
        d.write_all(b"reply after EOF").unwrap();
        d.shutdown(Shutdown::Write).unwrap();
        writer.join().unwrap()
    });
    let (outcome, reply) = tokio::join!(proxy, ends);
    let outcome = outcome.ok().expect("sockmap declined an established pair");
    assert_eq!(reply.unwrap(), b"reply after EOF");
    assert!(matches!(outcome.end, End::Complete), "{:?}", outcome.end);
    assert_eq!((outcome.up, outcome.down), (N, 15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_stalls_the_sender() {
    let Some(sockmap) = load() else { return };
    let (a, b, c, mut d) = sockets();
    const BUDGET: u64 = 4 << 20;
    let pool = Arc::new(Pool::new(64 << 20));
    let budget = Budget {
        per_direction: BUDGET,
        pool: pool.clone(),
    };
    let cancel = CancellationToken::new();
    let proxy = async { run(&sockmap, b, c, Some(16 << 20), &budget, &cancel).await };
    let ends = tokio::task::spawn_blocking(move || {
        // The upstream reads nothing for 2 s while the client writes what it can.
        a.set_nonblocking(true).unwrap();
        let mut a = a;
        let start = std::time::Instant::now();
        let mut sent = 0u64;
        let mut buf = vec![0u8; 65536];
        while start.elapsed() < Duration::from_secs(2) {
            for (k, x) in buf.iter_mut().enumerate() {
                *x = pattern(sent + k as u64);
            }
            match a.write(&buf) {
                Ok(n) => sent += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    // Re-generate from the new offset next time round.
                }
                Err(e) => panic!("client write: {e}"),
            }
        }
        a.set_nonblocking(false).unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        assert_eq!(upstream_receives(&mut d), sent);
        d.shutdown(Shutdown::Write).unwrap();
        sent
    });
    let (outcome, sent) = tokio::join!(proxy, ends);
    let sent = sent.unwrap();
    let outcome = outcome.ok().expect("sockmap declined an established pair");
    assert!(matches!(outcome.end, End::Complete), "{:?}", outcome.end);
    assert_eq!(outcome.up, sent);
    // Socket buffers: the client's send queue, the proxy's receive and 16 MiB send queue,
    // the upstream's receive queue (tcp_rmem max 6 MiB each); plus the budget.
    let bound = BUDGET + (16 << 20) + 3 * (6 << 20) + (4 << 20);
    eprintln!("client got {sent} bytes out while the upstream did not read (bound {bound})");
    assert!(sent < bound, "client sent {sent} bytes, bound {bound}");
    assert_eq!(pool.reserved(), 0);
}

/// The client's FIN arrives while its socket is paused, so it cannot be re-activated
/// (CLOSE_WAIT): its last bytes go through the userspace tail copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fin_while_paused_loses_nothing() {
    let Some(sockmap) = load() else { return };
    let (a, b, c, mut d) = sockets();
    const N: u64 = 8 << 20;
    let budget = budget(1 << 20);
    // A large receive buffer on the proxy's client socket, so that the rest of the data and
    // the FIN fit into it while it is paused.
    socket2::SockRef::from(&b)
        .set_recv_buffer_size(32 << 20)
        .unwrap();
    let cancel = CancellationToken::new();
    let proxy = async { run(&sockmap, b, c, Some(1 << 20), &budget, &cancel).await };
    let ends = tokio::task::spawn_blocking(move || {
        let writer = client_sends(a, N);
        std::thread::sleep(Duration::from_millis(1500));
        let i = upstream_receives(&mut d);
        d.shutdown(Shutdown::Write).unwrap();
        writer.join().unwrap();
        i
    });
    let (outcome, got) = tokio::join!(proxy, ends);
    assert_eq!(got.unwrap(), N);
    let outcome = outcome.ok().expect("sockmap declined an established pair");
    assert!(matches!(outcome.end, End::Complete), "{:?}", outcome.end);
    assert_eq!(outcome.up, N);
}

/// Bytes userspace read from the client and wrote to the upstream before the join, in unequal
/// amounts (a front proxy's PROXY header read and dropped, our own written): the FIN must still
/// follow the last byte, neither early (trap 6) nor never.
async fn headers_before_the_join(front: usize, ours: usize) {
    let Some(sockmap) = load() else { return };
    let (mut a, mut b, mut c, mut d) = sockets();
    const N: u64 = 8 << 20;
    a.write_all(&vec![b'F'; front]).unwrap();
    b.set_nonblocking(false).unwrap();
    let mut header = vec![0u8; front];
    b.read_exact(&mut header).unwrap();
    b.set_nonblocking(true).unwrap();
    c.set_nonblocking(false).unwrap();
    c.write_all(&vec![b'P'; ours]).unwrap();
    c.set_nonblocking(true).unwrap();
    let cancel = CancellationToken::new();
    let budget = budget(1 << 20);
    let proxy = async { run(&sockmap, b, c, Some(1 << 20), &budget, &cancel).await };
    let ends = tokio::task::spawn_blocking(move || {
        let writer = client_sends(a, N);
        let mut ours_got = vec![0u8; ours];
        d.read_exact(&mut ours_got).unwrap();
        let i = upstream_receives(&mut d);
        d.shutdown(Shutdown::Write).unwrap();
        (i, writer.join().unwrap())
    });
    // A failed end stops the connection, which would otherwise wait for a FIN for ever.
    let ends = async {
        let r = ends.await;
        if r.is_err() {
            cancel.cancel();
        }
        r
    };
    let (outcome, ends) = tokio::join!(proxy, ends);
    let (got, rest) = ends.unwrap();
    assert_eq!(got, N, "upstream got {got} of {N} bytes");
    assert!(rest.is_empty());
    let outcome = outcome.ok().expect("sockmap declined an established pair");
    assert!(matches!(outcome.end, End::Complete), "{:?}", outcome.end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_header_read_before_the_join() {
    headers_before_the_join(52, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_header_written_before_the_join() {
    headers_before_the_join(0, 108).await;
}
