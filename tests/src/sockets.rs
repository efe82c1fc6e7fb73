//! Sockets: connecting and accepting with bounded waits, exchanges that assert what arrives,
//! how a connection ends, and the socket options and queue sizes the tests set and read
//! (through `socket2` where it has the option).
use std::{
    fs, io,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd},
    time::{Duration, Instant},
};

use socket2::SockRef;

use crate::{read_exact, wait_until};

/// Read and write timeouts.
pub fn set_timeouts(s: &TcpStream, t: Duration) {
    s.set_read_timeout(Some(t)).unwrap();
    s.set_write_timeout(Some(t)).unwrap();
}

/// Connects to `addr` (at most 5 s), with 60 s timeouts set.
pub fn connect_to(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    set_timeouts(&s, Duration::from_secs(60));
    s
}

/// Accepts one connection (at most `limit`), with 60 s timeouts set.
pub fn accept(listener: &TcpListener, limit: Duration) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let accepted = || match listener.accept() {
        Ok((s, _)) => Some(s),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("accept: {e}"),
    };
    let failure = || format!("no connection accepted within {limit:?}");
    let s = wait_until(limit, Duration::from_millis(5), accepted, failure);
    s.set_nonblocking(false).unwrap();
    set_timeouts(&s, Duration::from_secs(60));
    s
}

/// Asserts that `listener` has no connection waiting.
pub fn assert_no_connection(listener: &TcpListener, why: &str) {
    listener.set_nonblocking(true).unwrap();
    let got = listener.accept();
    listener.set_nonblocking(false).unwrap();
    match got {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        r => panic!("{why}: {r:?}"),
    }
}

/// Writes `bytes` to `from` and asserts exactly they arrive at `to`.
pub fn carry(from: &mut TcpStream, to: &mut TcpStream, bytes: &[u8]) {
    from.write_all(bytes).expect("write");
    assert_eq!(read_exact(to, bytes.len()), bytes, "bytes that arrived");
}

/// The client sends `up`, the server receives it; the server replies `down`, the client receives
/// it. Both stay open. Keep both below the socket buffers: each side writes before the other
/// reads.
pub fn exchange(c: &mut TcpStream, s: &mut TcpStream, up: &[u8], down: &[u8]) {
    c.write_all(up).expect("client write");
    assert_eq!(read_exact(s, up.len()), up, "bytes at the upstream");
    s.write_all(down).expect("upstream write");
    assert_eq!(read_exact(c, down.len()), down, "bytes at the client");
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

/// Reads `s` into `buf`, retrying reads interrupted by a signal. The test process is
/// multi-threaded and spawns children: a SIGCHLD that arrives while the spawning thread has
/// signals blocked (glibc's posix_spawn) is not discarded and can interrupt another thread's
/// read, which fails with EINTR because the socket has a receive timeout.
pub fn read_retrying(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    for _ in 0..1000 {
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
    panic!("1000 reads in a row were interrupted")
}

/// Asserts that `s` sees EOF or a reset within `limit` (not an interrupted read: see
/// [`read_retrying`]); returns how long it took.
pub fn closed_within(s: &mut TcpStream, limit: Duration) -> Duration {
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let left = limit.checked_sub(t.elapsed()).filter(|d| !d.is_zero());
        let left = left.unwrap_or_else(|| panic!("not closed within {limit:?}"));
        s.set_read_timeout(Some(left)).unwrap();
        match read_retrying(s, &mut buf) {
            Ok(0) => return t.elapsed(),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("not closed within {limit:?}")
            }
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
                return t.elapsed();
            }
        }
    }
}

/// Connects to `addr` and asserts the connection is closed or reset within `limit`: what the
/// daemon does to a client it refuses, or whose upstream it cannot reach. The reset may come
/// before connect() returns.
pub fn assert_closed_on_connect(addr: SocketAddr, limit: Duration) {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(mut c) => {
            closed_within(&mut c, limit);
        }
        Err(e) => assert_eq!(
            e.kind(),
            io::ErrorKind::ConnectionReset,
            "connect to {addr}: {e}"
        ),
    }
}

/// Asserts that a connect to `addr` is refused (nothing listens there).
pub fn assert_refused(addr: SocketAddr) {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(s) => panic!("connect to {addr} succeeded (from {:?})", s.local_addr()),
        Err(e) => assert_eq!(
            e.kind(),
            io::ErrorKind::ConnectionRefused,
            "connect to {addr}: {e}"
        ),
    }
}

/// A free port on 127.0.0.1 (bound and released; nothing else here binds explicit ports).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The ports of the TCP sockets process `pid` listens on, a port once per socket, from its file
/// descriptors and its namespace's /proc/net/tcp{,6}.
pub fn listening_sockets(pid: i32) -> Vec<u16> {
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|link| {
            let link = link.to_str()?.to_owned();
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                let port = f[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).expect("hex port"));
            }
        }
    }
    ports
}

/// The TCP ports process `pid` listens on, each once (a route may listen with a socket per
/// lane).
pub fn listening_ports(pid: i32) -> Vec<u16> {
    let mut ports = listening_sockets(pid);
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Sets SO_LINGER to 0: closing the socket then sends a RST instead of a FIN.
pub fn set_linger_zero(s: &TcpStream) {
    SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
}

/// Closes `s` with a RST instead of a FIN (SO_LINGER 0).
pub fn reset(s: TcpStream) {
    set_linger_zero(&s);
}

/// `sk_sndbuf` (SO_SNDBUF): what the socket's send queue may hold (in truesize, which exceeds
/// payload).
pub fn sndbuf(s: &impl AsFd) -> u64 {
    SockRef::from(s).send_buffer_size().expect("SO_SNDBUF") as u64
}

/// `sk_rcvbuf` (SO_RCVBUF).
pub fn rcvbuf(s: &impl AsFd) -> u64 {
    SockRef::from(s).recv_buffer_size().expect("SO_RCVBUF") as u64
}

/// Sets SO_SNDBUF to `half`: the kernel doubles it (and clamps it to `net.core.wmem_max`).
pub fn set_sndbuf(s: &impl AsFd, half: u64) {
    SockRef::from(s)
        .set_send_buffer_size(half as usize)
        .expect("SO_SNDBUF");
}

/// Sets SO_RCVBUF to `half`: the kernel doubles it (and clamps it to `net.core.rmem_max`).
pub fn set_rcvbuf(s: &impl AsFd, half: u64) {
    SockRef::from(s)
        .set_recv_buffer_size(half as usize)
        .expect("SO_RCVBUF");
}

/// Sets SO_SNDBUFFORCE to `half` (root; past `net.core.wmem_max`). By hand: socket2 does not
/// have this option.
pub fn set_sndbuf_force(s: &impl AsFd, half: u64) {
    let v = libc::c_int::try_from(half).expect("SO_SNDBUFFORCE fits an int");
    // SAFETY: an int-sized option from an int, on an open socket.
    let rc = unsafe {
        libc::setsockopt(
            s.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_SNDBUFFORCE: {}", io::Error::last_os_error());
}

/// An ioctl that reads one int. By hand: socket2 has no SIOCINQ/SIOCOUTQ.
fn ioctl_int(s: &impl AsFd, req: libc::Ioctl, what: &str) -> u64 {
    let mut v: libc::c_int = 0;
    // SAFETY: SIOCINQ/SIOCOUTQ write one int.
    let rc = unsafe { libc::ioctl(s.as_fd().as_raw_fd(), req, &mut v) };
    assert_eq!(rc, 0, "{what}: {}", io::Error::last_os_error());
    v as u64
}

/// Payload bytes in the receive queue, not yet read (SIOCINQ).
pub fn inq(s: &impl AsFd) -> u64 {
    ioctl_int(s, libc::FIONREAD, "SIOCINQ")
}

/// Payload bytes in the send queue, unsent or unacknowledged (SIOCOUTQ).
pub fn outq(s: &impl AsFd) -> u64 {
    ioctl_int(s, libc::TIOCOUTQ, "SIOCOUTQ")
}
