//! When `copy_then_promote` moves a connection on, on loopback pairs (no eBPF needed: only the
//! copy path runs here).
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream as StdStream},
    thread,
    time::Duration,
};

use super::*;

/// (client end, proxy's client socket, proxy's upstream socket, upstream end); the lanes'
/// tests use it too.
pub(in crate::forward) fn sockets() -> (StdStream, TcpStream, TcpStream, StdStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let a = StdStream::connect(addr).unwrap();
    let (b, _) = l.accept().unwrap();
    let c = StdStream::connect(addr).unwrap();
    let (d, _) = l.accept().unwrap();
    for s in [&a, &d] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    for s in [&b, &c] {
        s.set_nonblocking(true).unwrap();
    }
    (
        a,
        TcpStream::from_std(b).unwrap(),
        TcpStream::from_std(c).unwrap(),
        d,
    )
}

/// Runs the copy path until it promotes, then carries the rest on the copy path again (as a
/// stand-in for the next path, so the ends see every byte); returns why it promoted and what
/// it carried before.
async fn promote(client: TcpStream, upstream: TcpStream, p: Promotion) -> (Reached, u64, u64) {
    let cancel = CancellationToken::new();
    let run = copy_then_promote(client, upstream, p, &cancel);
    let limit = Duration::from_secs(20);
    let (by, up, down, client, upstream) = match tokio::time::timeout(limit, run).await {
        Ok(Started::Promote {
            by,
            up,
            down,
            client,
            upstream,
        }) => (by, up, down, client, upstream),
        Ok(Started::Done(o)) => panic!("ended on the copy path: {:?}", o.end),
        Err(_) => panic!("not promoted within 20 s"),
    };
    let rest = tokio::time::timeout(limit, copy(client, upstream, &cancel))
        .await
        .expect("the rest within 20 s");
    assert!(matches!(rest.end, End::Complete), "{:?}", rest.end);
    (by, up, down)
}

#[tokio::test]
async fn round_trips_move_on_after_their_turns() {
    let (mut a, b, c, mut d) = sockets();
    // 8 turns: request 1 read (no turn yet), response 1 (turn 1), ... request 5 (turn 8).
    let client = thread::spawn(move || {
        let mut buf = [0u8; 64];
        for i in 0..5u8 {
            a.write_all(&[i; 64]).unwrap();
            a.read_exact(&mut buf).unwrap();
            assert_eq!(buf, [i; 64]);
        }
        a.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(a.read(&mut buf).unwrap(), 0);
    });
    let upstream = thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..5 {
            d.read_exact(&mut buf).unwrap();
            d.write_all(&buf).unwrap();
        }
        assert_eq!(d.read(&mut buf).unwrap(), 0);
    });
    let p = Promotion {
        bytes: 1 << 30,
        turns: 8,
        after: Duration::from_secs(3600),
    };
    let (by, up, down) = promote(b, c, p).await;
    assert_eq!(by, Reached::Turns);
    assert_eq!(up, 5 * 64);
    assert!(down == 4 * 64 || down == 5 * 64, "{down}");
    client.join().unwrap();
    upstream.join().unwrap();
}

#[tokio::test]
async fn a_download_in_small_reads_reaches_bytes_not_turns() {
    let (mut a, b, c, mut d) = sockets();
    // One request, then a download in 2 KiB writes 1 ms apart: the proxy's reads stay small,
    // and the talk turns once.
    let client = thread::spawn(move || {
        a.write_all(b"GET").unwrap();
        let mut got = vec![0u8; 300 * 1024];
        a.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|b| *b == 7));
        a.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(a.read(&mut got).unwrap(), 0);
    });
    let upstream = thread::spawn(move || {
        let mut req = [0u8; 3];
        d.read_exact(&mut req).unwrap();
        for _ in 0..150 {
            d.write_all(&[7u8; 2048]).unwrap();
            thread::sleep(Duration::from_millis(1));
        }
        d.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(d.read(&mut req).unwrap(), 0);
    });
    let p = Promotion {
        bytes: 256 * 1024,
        turns: 4,
        after: Duration::from_secs(3600),
    };
    let (by, _, down) = promote(b, c, p).await;
    assert_eq!(by, Reached::Bytes);
    assert!(down >= 256 * 1024, "{down}");
    client.join().unwrap();
    upstream.join().unwrap();
}

/// TCP urgent data on the splice path: splice(2) stops at the urgent mark, so the byte is read
/// in line there and everything after it still arrives, in order (`Pipe::past_urgent_mark`).
#[tokio::test]
async fn splice_carries_urgent_data_and_what_follows() {
    let (a, b, c, mut d) = sockets();
    let cancel = CancellationToken::new();
    let sender = thread::spawn(move || {
        let send = |bytes: &[u8], flags| {
            // SAFETY: `bytes` is valid for reads of its length.
            let n = unsafe { libc::send(a.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), flags) };
            assert_eq!(n, bytes.len() as isize);
        };
        send(b"hello", 0);
        thread::sleep(Duration::from_millis(50));
        send(b"ab", libc::MSG_OOB);
        send(b"cdef", 0);
        thread::sleep(Duration::from_millis(50));
        send(b"XYZ", 0);
        a.shutdown(std::net::Shutdown::Write).unwrap();
        a
    });
    let reader = thread::spawn(move || {
        let mut got = Vec::new();
        d.read_to_end(&mut got).unwrap();
        d.shutdown(std::net::Shutdown::Write).unwrap();
        got
    });
    let outcome = tokio::time::timeout(Duration::from_secs(10), splice(b, c, &cancel))
        .await
        .expect("the splice path stopped at the urgent byte");
    let _a = sender.join().unwrap();
    assert_eq!(reader.join().unwrap(), b"helloabcdefXYZ");
    assert!(matches!(outcome.end, End::Complete), "{}", outcome.end);
}
