//! Socket options and queries spliced needs beyond std and tokio: through socket2 where it has
//! them; by hand (libc) where it does not: SO_COOKIE, TCP_INFO's byte counters, SIOCOUTQ,
//! TCP_WINDOW_CLAMP, SO_SNDBUFFORCE, and non-blocking recv/send on a socket tokio does not own.
use std::{
    io,
    mem::{size_of, MaybeUninit},
    net::Shutdown,
    os::fd::{AsFd, AsRawFd, RawFd},
    time::Duration,
};

use socket2::SockRef;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Reads a fixed-size socket option.
fn getsockopt<T: Copy>(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is valid for `len` bytes, and the kernel writes at most `len`.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    // SAFETY: zero-initialised and partly or wholly written by the kernel; T is plain data.
    Ok(unsafe { value.assume_init() })
}

fn setsockopt<T: Copy>(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: T,
) -> io::Result<()> {
    // SAFETY: `value` is valid for its size for the duration of the call.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The socket's cookie (`SO_COOKIE`, Linux 4.12): a 64-bit id unique for the boot, the key of
/// every spliced map. Unlike a 4-tuple it tells apart two `fe80::` peers on different links.
pub fn cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    getsockopt::<u64>(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// The peer address of the socket numbered `fd` (getpeername); `None` when it has none (not
/// connected, reset) or the number is no socket. By number: the connection registry asks about
/// descriptors it does not own.
pub fn peer_of(fd: &impl AsRawFd) -> Option<std::net::SocketAddr> {
    let fd = fd.as_raw_fd();
    // SAFETY: getpeername writes at most `len` bytes into the storage socket2 provides.
    let (_, addr) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            check(libc::getpeername(fd, storage.cast(), len)).map(drop)
        })
    }
    .ok()?;
    addr.as_socket()
}

/// The head of the kernel's `struct tcp_info` (include/uapi/linux/tcp.h), up to the byte
/// counters spliced needs (Linux 4.1 for `bytes_acked`/`bytes_received`, 4.19 for the rest it
/// reads). The kernel copies `min(len, sizeof)` bytes, so a shorter struct is fine.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpInfo {
    pub state: u8,
    pub ca_state: u8,
    pub retransmits: u8,
    pub probes: u8,
    pub backoff: u8,
    pub options: u8,
    pub wscale: u8,
    pub flags: u8,
    pub rto: u32,
    pub ato: u32,
    pub snd_mss: u32,
    pub rcv_mss: u32,
    pub unacked: u32,
    pub sacked: u32,
    pub lost: u32,
    pub retrans: u32,
    pub fackets: u32,
    pub last_data_sent: u32,
    pub last_ack_sent: u32,
    pub last_data_recv: u32,
    pub last_ack_recv: u32,
    pub pmtu: u32,
    pub rcv_ssthresh: u32,
    pub rtt: u32,
    pub rttvar: u32,
    pub snd_ssthresh: u32,
    pub snd_cwnd: u32,
    pub advmss: u32,
    pub reordering: u32,
    pub rcv_rtt: u32,
    pub rcv_space: u32,
    pub total_retrans: u32,
    pub pacing_rate: u64,
    pub max_pacing_rate: u64,
    /// Bytes the peer has acknowledged; counts our SYN when we called connect().
    pub bytes_acked: u64,
    /// Bytes received in sequence; counts the peer's FIN once it has arrived.
    pub bytes_received: u64,
}

/// `TCP_INFO` for the socket.
pub fn tcp_info(fd: &impl AsRawFd) -> io::Result<TcpInfo> {
    getsockopt::<TcpInfo>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}

/// Bytes in the send queue not yet acknowledged by the peer (`SIOCOUTQ`).
pub fn outq(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) })?;
    Ok(n as u64)
}

/// Bytes in the receive queue not yet read (`SIOCINQ`).
pub fn inq(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCINQ (FIONREAD) writes one int.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) })?;
    Ok(n as u64)
}

/// Whether the next byte to read is TCP urgent data (`SIOCATMARK`, 0x8905 in
/// asm-generic/sockios.h on every Linux architecture; the libc crate lacks it).
pub fn at_urgent_mark(fd: &impl AsRawFd) -> io::Result<bool> {
    const SIOCATMARK: libc::Ioctl = 0x8905;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one int.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), SIOCATMARK, &mut n) })?;
    Ok(n != 0)
}

/// `SO_OOBINLINE`: TCP urgent bytes are read in line with the rest, not set aside.
pub fn set_urgent_inline(fd: &impl AsFd) -> io::Result<()> {
    SockRef::from(fd).set_out_of_band_inline(true)
}

/// The pending socket error (`SO_ERROR`), cleared by reading it.
pub fn take_error(fd: &impl AsFd) -> io::Result<Option<io::Error>> {
    SockRef::from(fd).take_error()
}

/// Sets `SO_SNDBUF`, using `SO_SNDBUFFORCE` first so root is not capped by `wmem_max`.
/// Setting it turns the kernel's send-buffer autotuning off for this socket.
pub fn set_send_buffer(fd: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes / 2).unwrap_or(libc::c_int::MAX / 2);
    // The kernel doubles the value for bookkeeping overhead; halve it so `bytes` is what is set.
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, bytes)
        .or_else(|_| setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, bytes))
}

/// Arms `SO_LINGER {on, 0}` so that the next close sends an RST instead of a FIN.
pub fn set_linger_zero(fd: &impl AsFd) -> io::Result<()> {
    SockRef::from(fd).set_linger(Some(Duration::ZERO))
}

/// Sets `TCP_NODELAY` (on a listener: every socket it accepts has it too).
pub fn set_nodelay(fd: &impl AsFd) -> io::Result<()> {
    SockRef::from(fd).set_nodelay(true)
}

/// Whether TCP_NODELAY is set.
pub fn nodelay(fd: &impl AsFd) -> io::Result<bool> {
    SockRef::from(fd).nodelay()
}

/// `shutdown(fd, SHUT_WR)`: sends our FIN once the send queue is out.
pub fn shutdown_write(fd: &impl AsFd) -> io::Result<()> {
    SockRef::from(fd).shutdown(Shutdown::Write)
}

/// A non-blocking `recv(MSG_DONTWAIT)`: `Ok(Some(n))` for n bytes (0 = EOF queued),
/// `Ok(None)` for `EAGAIN`.
pub fn recv_nonblocking(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: a `[u8]` is a valid `[MaybeUninit<u8>]` of the same length; recv only writes.
    let buf = unsafe { &mut *(std::ptr::from_mut(buf) as *mut [std::mem::MaybeUninit<u8>]) };
    recv_nonblocking_uninit(fd, buf)
}

/// [`recv_nonblocking`] of at most `max` bytes appended to `buf`, read into its spare capacity
/// (no zeroing first: zeroing 256 KiB per read showed in a profile).
pub fn recv_append(fd: RawFd, buf: &mut Vec<u8>, max: usize) -> io::Result<Option<usize>> {
    buf.reserve(max);
    let got = recv_nonblocking_uninit(fd, &mut buf.spare_capacity_mut()[..max])?;
    if let Some(n) = got {
        // SAFETY: recv initialised the first `n` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
    }
    Ok(got)
}

/// [`recv_nonblocking`] into memory that need not be initialised; on `Ok(Some(n))` the first
/// `n` bytes are.
fn recv_nonblocking_uninit(
    fd: RawFd,
    buf: &mut [std::mem::MaybeUninit<u8>],
) -> io::Result<Option<usize>> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(err)
    }
}

/// `send(MSG_DONTWAIT | MSG_NOSIGNAL)`: `Ok(None)` when the send buffer is full.
pub fn send_nonblocking(fd: RawFd, buf: &[u8]) -> io::Result<Option<usize>> {
    // SAFETY: `buf` is valid for reads of its length.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(err)
    }
}

/// `TCP_WINDOW_CLAMP`: the most this socket will advertise as its receive window.
pub fn window_clamp(fd: &impl AsRawFd) -> io::Result<i32> {
    getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP)
}

/// Sets `TCP_WINDOW_CLAMP`.
pub fn set_window_clamp(fd: &impl AsRawFd, bytes: i32) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP, bytes)
}

/// Fixes the receive buffer at its current (autotuned) size. Receive autotuning, which runs on
/// every `recv`, would otherwise raise a window clamp right back.
pub fn lock_receive_buffer(fd: &impl AsRawFd) -> io::Result<()> {
    let now: libc::c_int = getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF)?;
    // The kernel doubles what is set; `now` is already the doubled value.
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, now / 2)
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// The kernel fact `listen::accept_loop` relies on: an accepted socket starts with its
    /// listener's TCP_NODELAY (the listener's tcp_sock is cloned).
    #[test]
    fn accepted_sockets_inherit_nodelay() {
        for set in [true, false] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            if set {
                set_nodelay(&listener).unwrap();
            }
            let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            assert_eq!(accepted.nodelay().unwrap(), set);
        }
    }

    /// The same for SO_OOBINLINE (a socket flag the clone copies too).
    #[test]
    fn accepted_sockets_inherit_urgent_inline() {
        for set in [true, false] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            if set {
                set_urgent_inline(&listener).unwrap();
            }
            let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            assert_eq!(SockRef::from(&accepted).out_of_band_inline().unwrap(), set);
        }
    }
}
