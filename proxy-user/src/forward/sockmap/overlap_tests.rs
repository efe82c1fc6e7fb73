//! Trap 11 on a real socket: a retransmission that overlaps bytes the sockmap socket has
//! received already. TCP queues such a segment whole and `tcp_read_skb` hands it to the verdict
//! whole, so without the verdict's cut the old part reaches the upstream twice.
//!
//! The client's side of the retransmission is made with TCP_REPAIR (root): the client socket is
//! closed silently in repair mode and rebuilt on the same 4-tuple with its send sequence moved
//! back, and the old bytes plus new ones queued as if sent; the kernel then retransmits them as
//! one segment (tail loss probe or RTO, about 1 s later), exactly as after a lost ACK.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr},
    os::fd::AsRawFd,
    sync::Arc,
    time::Duration,
};

use socket2::{Domain, Socket, Type};

use super::tests::{budget, load, pattern, sockets};
use super::*;

const TCP_SEND_QUEUE: libc::c_int = 2;
const TCP_RECV_QUEUE: libc::c_int = 1;
/// Leave repair mode without a window probe: its ACK would tell the rebuilt socket that the old
/// bytes arrived, and it would trim them before retransmitting.
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;

/// `struct tcp_repair_window` (include/uapi/linux/tcp.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RepairWindow {
    snd_wl1: u32,
    snd_wnd: u32,
    max_window: u32,
    rcv_wnd: u32,
    rcv_wup: u32,
}

fn set<T: Copy>(fd: &impl AsRawFd, name: libc::c_int, value: &T) {
    // SAFETY: `value` is valid for its size during the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt {name}: {}", io::Error::last_os_error());
}

fn get<T: Copy + Default>(fd: &impl AsRawFd, name: libc::c_int) -> T {
    let mut value = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is valid for `len` bytes and the kernel writes at most `len`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            name,
            (&mut value as *mut T).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "getsockopt {name}: {}", io::Error::last_os_error());
    value
}

/// What a rebuilt socket needs of the old one.
struct Repair {
    local: SocketAddr,
    peer: SocketAddr,
    send_seq: u32,
    recv_seq: u32,
    window: RepairWindow,
    timestamp: u32,
    options: Vec<[u32; 2]>,
}

/// Puts `s` into repair mode, reads its state and closes it without a FIN or RST.
fn take_apart(s: TcpStream) -> Repair {
    let info = sockopt::tcp_info(&s).unwrap();
    set(&s, libc::TCP_REPAIR, &1);
    set(&s, libc::TCP_REPAIR_QUEUE, &TCP_SEND_QUEUE);
    let send_seq = get::<u32>(&s, libc::TCP_QUEUE_SEQ);
    set(&s, libc::TCP_REPAIR_QUEUE, &TCP_RECV_QUEUE);
    let recv_seq = get::<u32>(&s, libc::TCP_QUEUE_SEQ);
    let mut options = vec![[TCPOPT_MAXSEG, get::<u32>(&s, libc::TCP_MAXSEG)]];
    if info.options & 4 != 0 {
        // tcpi_snd_wscale is the low nibble, tcpi_rcv_wscale the high one.
        let (snd, rcv) = (u32::from(info.wscale & 15), u32::from(info.wscale >> 4));
        options.push([TCPOPT_WINDOW, snd | rcv << 16]);
    }
    if info.options & 2 != 0 {
        options.push([TCPOPT_SACK_PERM, 0]);
    }
    if info.options & 1 != 0 {
        options.push([TCPOPT_TIMESTAMP, 0]);
    }
    Repair {
        local: s.local_addr().unwrap(),
        peer: s.peer_addr().unwrap(),
        send_seq,
        recv_seq,
        window: get(&s, libc::TCP_REPAIR_WINDOW),
        timestamp: get(&s, libc::TCP_TIMESTAMP),
        options,
    }
}

/// Rebuilds the connection `r` with its send sequence `back` bytes earlier and `data` (the last
/// `back` bytes already sent, then new ones) queued as sent and unacknowledged; `mss` for
/// segments larger than the default 536 bytes.
fn rebuild(r: &Repair, back: u32, mss: Option<u32>, data: &[u8]) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    if let Some(mss) = mss {
        set(&s, libc::TCP_MAXSEG, &mss);
    }
    // Repair mode binds whatever else holds the address (SK_FORCE_REUSE).
    set(&s, libc::TCP_REPAIR, &1);
    s.bind(&r.local.into()).unwrap();
    set(&s, libc::TCP_REPAIR_QUEUE, &TCP_SEND_QUEUE);
    set(&s, libc::TCP_QUEUE_SEQ, &r.send_seq.wrapping_sub(back));
    set(&s, libc::TCP_REPAIR_QUEUE, &TCP_RECV_QUEUE);
    set(&s, libc::TCP_QUEUE_SEQ, &r.recv_seq);
    // In repair mode connect() sends no SYN: the socket is ESTABLISHED at once.
    s.connect(&r.peer.into()).unwrap();
    // SAFETY: the slice of pairs is `struct tcp_repair_opt[]`, valid during the call.
    let ret = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_OPTIONS,
            r.options.as_ptr().cast(),
            (r.options.len() * 8) as libc::socklen_t,
        )
    };
    assert_eq!(ret, 0, "TCP_REPAIR_OPTIONS: {}", io::Error::last_os_error());
    set(&s, libc::TCP_TIMESTAMP, &r.timestamp);
    set(&s, libc::TCP_REPAIR_WINDOW, &r.window);
    set(&s, libc::TCP_REPAIR_QUEUE, &TCP_SEND_QUEUE);
    // Queued and counted as sent, not transmitted: the retransmission timer sends it.
    assert_eq!(s.send(data).unwrap(), data.len());
    set(&s, libc::TCP_REPAIR, &TCP_REPAIR_OFF_NO_WP);
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn bytes(from: u64, to: u64) -> Vec<u8> {
    (from..to).map(pattern).collect()
}

fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// Position of the first byte of `got` that is not the pattern, or of its end.
fn first_wrong(got: &[u8]) -> usize {
    got.iter()
        .enumerate()
        .position(|(i, &x)| x != pattern(i as u64))
        .unwrap_or(got.len())
}

/// A connection through sockmap: `FIRST` bytes, then one segment with the last `old` of them
/// and `new` new ones, then `LAST` more; the upstream must get each byte once and in order.
async fn overlapping_retransmission(old: u64, new: u64, mss: Option<u32>) {
    const FIRST: u64 = 64 << 10;
    const LAST: u64 = 256 << 10;
    let total = FIRST + new + LAST;
    let Some(sockmap) = load() else { return };
    let sockmap = Arc::new(sockmap);
    let (a, b, c, mut d) = sockets();
    let cookie = sockopt::cookie(&b).unwrap();
    let cancel = CancellationToken::new();
    let budget = budget(4 << 20);
    let proxy = {
        let sockmap = sockmap.clone();
        async move { run(&sockmap, b, c, None, &budget, &cancel).await }
    };
    let map = sockmap.clone();
    let ends = tokio::task::spawn_blocking(move || {
        let mut a = a;
        a.write_all(&bytes(0, FIRST)).unwrap();
        let mut got = read_exactly(&mut d, FIRST as usize);
        // Any ACK of b's still on its way (a delayed one, a window update) must reach the old
        // socket: one reaching the rebuilt socket would make it trim the old bytes.
        std::thread::sleep(Duration::from_millis(300));
        let repair = take_apart(a);
        let mut a = rebuild(&repair, old as u32, mss, &bytes(FIRST - old, FIRST + new));
        // Arrives with the retransmission, about a second later.
        got.extend(read_exactly(&mut d, new as usize));
        let trimmed = map.stats(cookie).trimmed;
        a.write_all(&bytes(FIRST + new, total)).unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        d.read_to_end(&mut got).unwrap();
        d.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        a.read_to_end(&mut rest).unwrap();
        (got, trimmed, rest)
    });
    let (outcome, ends) = tokio::join!(proxy, ends);
    let (got, trimmed, rest) = ends.unwrap();
    let wrong = first_wrong(&got);
    assert!(
        wrong == got.len() && got.len() as u64 == total,
        "upstream got {} bytes for {total}, first wrong at {wrong} (old bytes forwarded twice)",
        got.len()
    );
    assert_eq!(trimmed, old, "bytes the verdict cut");
    assert!(rest.is_empty());
    let outcome = outcome.ok().expect("sockmap declined an established pair");
    assert!(matches!(outcome.end, End::Complete), "{:?}", outcome.end);
    assert_eq!((outcome.up, outcome.down), (total, 0));
}

/// A small segment: its 200 old bytes go in one cut. The rebuilt socket keeps the default MSS
/// (536 less the timestamps), and 500 bytes fit one segment: the loss probe resends only the
/// last segment of a tail, and the SACK for it would tell the rebuilt socket that the old bytes
/// had arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmission_overlapping_forwarded_bytes_is_not_forwarded_twice() {
    overlapping_retransmission(200, 300, None).await;
}

/// A 30,000-byte segment (TCP_MAXSEG allows at most 32,767) with 12,000 old bytes: more than
/// one `bpf_skb_adjust_room` may cut (4,095), so the verdict cuts in three steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_overlap_is_cut_in_steps() {
    overlapping_retransmission(12_000, 18_000, Some(32_000)).await;
}
