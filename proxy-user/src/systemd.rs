//! systemd integration without libsystemd: readiness notifications (`sd_notify(3)`) and socket
//! activation (`sd_listen_fds_with_names(3)`).
//!
//! - Notifications go as one datagram to `$NOTIFY_SOCKET` (a path, or an abstract name written
//!   with a leading `@`): `READY=1` once every listener accepts, `RELOADING=1` with
//!   `MONOTONIC_USEC` when a SIGHUP reload starts and `READY=1` when it is over, `STOPPING=1`
//!   on SIGTERM/SIGINT. Without `$NOTIFY_SOCKET` nothing is sent.
//! - Socket activation: when `$LISTEN_PID` is this process, the descriptors 3 to
//!   3 + `$LISTEN_FDS` - 1 are listening sockets handed over by systemd, named by
//!   `$LISTEN_FDNAMES` (colon-separated; a socket unit's `FileDescriptorName=`, by default the
//!   unit's name). spliced gives each to the route of the same name instead of binding.
use std::{
    io,
    net::TcpListener,
    os::{
        fd::{FromRawFd, RawFd},
        unix::net::UnixDatagram,
    },
};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the service manager, if there is one.
/// Returns whether it was sent; failures are not fatal (systemd then times the service out and
/// says so itself).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

/// `RELOADING=1` with the `MONOTONIC_USEC` systemd 253+ wants with it.
pub fn reloading_message() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000;
    format!("RELOADING=1\nMONOTONIC_USEC={usec}")
}

/// A listening socket systemd handed over, with its name.
#[derive(Debug)]
pub struct Inherited {
    pub name: String,
    pub listener: TcpListener,
}

/// Takes the sockets systemd passed to this process (none when `$LISTEN_PID` is not this
/// process) and removes the `LISTEN_*` variables, so that they do not leak anywhere else. Call
/// before any thread is started. A descriptor that is not a listening TCP socket is an error
/// naming it and its name.
pub fn listen_fds() -> Result<Vec<Inherited>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let n: RawFd = fds
        .parse()
        .map_err(|_| format!("LISTEN_FDS={fds:?} is not a number of descriptors"))?;
    let names: Vec<&str> = names
        .as_deref()
        .map_or(Vec::new(), |n| n.split(':').collect());
    let mut out = Vec::new();
    for i in 0..n {
        let fd = LISTEN_FDS_START + i;
        let name = names
            .get(i as usize)
            .copied()
            .unwrap_or("unknown")
            .to_owned();
        check_listening_tcp(fd)
            .map_err(|e| format!("socket activation: descriptor {fd} (name {name:?}): {e}"))?;
        // SAFETY: systemd passed this descriptor to us; nothing else in the process owns it.
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        // systemd passes the descriptors without close-on-exec.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("socket activation: descriptor {fd} (name {name:?}): {e}"))?;
        out.push(Inherited { name, listener });
    }
    Ok(out)
}

fn getsockopt_int(fd: RawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid out pointer and its length.
    let rc =
        unsafe { libc::getsockopt(fd, level, name, (&mut value as *mut i32).cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn check_listening_tcp(fd: RawFd) -> Result<(), String> {
    let domain = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)
        .map_err(|e| format!("not a socket ({e})"))?;
    let kind = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(|e| e.to_string())?;
    let listening =
        getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).map_err(|e| e.to_string())?;
    if !matches!(domain, libc::AF_INET | libc::AF_INET6) || kind != libc::SOCK_STREAM {
        return Err(
            "not a TCP socket; spliced takes ListenStream= sockets with an IP address and port"
                .into(),
        );
    }
    if listening == 0 {
        return Err("not listening (Accept=yes is not supported; use Accept=no)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_without_a_manager_sends_nothing() {
        // The unit tests never run under a service manager's NOTIFY_SOCKET.
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            assert!(!notify("READY=1").unwrap());
        }
    }

    #[test]
    fn reloading_carries_the_monotonic_time() {
        let m = reloading_message();
        let usec: u64 = m
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(usec > 0);
    }

    #[test]
    fn only_listening_tcp_sockets_are_taken() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd;
        assert!(check_listening_tcp(l.as_raw_fd()).is_ok());
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert_eq!(
            check_listening_tcp(c.as_raw_fd()).unwrap_err(),
            "not listening (Accept=yes is not supported; use Accept=no)"
        );
        let u = UnixDatagram::unbound().unwrap();
        assert!(check_listening_tcp(u.as_raw_fd())
            .unwrap_err()
            .starts_with("not a TCP socket"));
    }
}
