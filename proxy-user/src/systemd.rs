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
        fd::{AsFd, FromRawFd, RawFd},
        unix::net::UnixDatagram,
    },
};

use socket2::{Domain, Type};

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the service manager, if there is one.
/// Kept by hand: the sd-notify crate (0.5) connects to `$NOTIFY_SOCKET` as a path and so cannot
/// reach an abstract socket (`@name`).
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

/// Why the sockets systemd passed cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS` or `LISTEN_FDNAMES` is malformed.
    #[error("socket activation: {0}")]
    Environment(#[source] io::Error),
    /// A descriptor is not what spliced can accept on.
    #[error("socket activation: descriptor {fd} (name {name:?}): {problem}")]
    Unusable {
        fd: RawFd,
        name: String,
        #[source]
        problem: SocketProblem,
    },
}

/// What is wrong with a passed descriptor.
#[derive(Debug, thiserror::Error)]
pub enum SocketProblem {
    #[error("not a socket ({0})")]
    NotASocket(#[source] io::Error),
    #[error("not a TCP socket; spliced takes ListenStream= sockets with an IP address and port")]
    NotTcp,
    #[error("not listening (Accept=yes is not supported; use Accept=no)")]
    NotListening,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Takes the sockets systemd passed to this process (none when `$LISTEN_PID` is not this
/// process) and removes the `LISTEN_*` variables, so that they do not leak anywhere else. Call
/// before any thread is started. A descriptor that is not a listening TCP socket is an error
/// naming it and its name.
pub fn listen_fds() -> Result<Vec<Inherited>, ActivationError> {
    // SAFETY: called before any other thread exists (main does so first), so nothing reads the
    // environment while it changes.
    let passed = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }
        .map_err(ActivationError::Environment)?;
    let mut out = Vec::new();
    for (fd, name) in passed {
        let unusable = |problem| ActivationError::Unusable {
            fd,
            name: name.clone(),
            problem,
        };
        // SAFETY: systemd passed this descriptor to us (sd_notify set it close-on-exec);
        // nothing else in the process owns it.
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        check_listening_tcp(&listener).map_err(unusable)?;
        listener
            .set_nonblocking(true)
            .map_err(|e| unusable(e.into()))?;
        out.push(Inherited { name, listener });
    }
    Ok(out)
}

fn check_listening_tcp(fd: &impl AsFd) -> Result<(), SocketProblem> {
    let socket = socket2::SockRef::from(fd);
    let domain = socket.domain().map_err(SocketProblem::NotASocket)?;
    if !matches!(domain, Domain::IPV4 | Domain::IPV6) || socket.r#type()? != Type::STREAM {
        return Err(SocketProblem::NotTcp);
    }
    if !socket.is_listener()? {
        return Err(SocketProblem::NotListening);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
