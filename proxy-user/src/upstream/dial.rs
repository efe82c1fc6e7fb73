//! The failover dial: connect a client to the first server of its set that answers, within the
//! route's `connect_timeout`.
use std::{
    fmt, io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;

use super::{
    ports::{self, PortPressure, Timed, Timer, SEARCH_CPU, SLOW_CONNECT},
    Lease, Server, Upstreams,
};
use crate::addr::AddrError;

/// What a dial may use besides the set: the route's (or match's) `connect_timeout` and
/// `interface`.
#[derive(Clone, Copy, Debug)]
pub struct DialOptions<'a> {
    pub connect_timeout: Duration,
    /// SO_BINDTODEVICE for the upstream socket.
    pub interface: Option<&'a str>,
}

/// A connected upstream.
#[derive(Debug)]
pub struct Dialed {
    pub stream: TcpStream,
    pub addr: SocketAddr,
    /// Counts the connection on its server until dropped: keep it as long as the connection.
    pub lease: Lease,
    /// Servers tried before this one, and why each failed (the client only saw the delay).
    pub failed: Vec<Attempt>,
}

/// One server a dial tried and gave up on.
#[derive(Debug)]
pub struct Attempt {
    pub server: String,
    pub error: ConnectError,
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.server, self.error)
    }
}

/// Why one connect to a server failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Refused, unreachable, reset: the server's side (or the network to it).
    #[error("connecting to {addr} failed: {err}")]
    Upstream { addr: SocketAddr, err: io::Error },
    /// No answer within the time this attempt had.
    #[error("no answer from {addr} within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    /// The route's `interface` cannot be used: a configuration problem, not the server's.
    #[error("interface {iface:?} (key `interface`): {err}")]
    Interface { iface: String, err: io::Error },
    /// spliced could not make a socket (descriptors, memory, local ports): ours, not the
    /// server's.
    #[error("spliced could not open a socket to {addr}: {err}")]
    Local { addr: SocketAddr, err: io::Error },
}

impl ConnectError {
    /// Whether the server is to blame (and is marked down).
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            ConnectError::Upstream { .. } | ConnectError::Timeout { .. }
        )
    }
}

/// Why a client could not be given an upstream.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// No entry of the set resolved (a host name, or a zone's interface that is gone).
    #[error("{0}")]
    Resolve(#[from] AddrError),
    /// Every server was tried and failed, or the connect timeout ran out first.
    #[error("no upstream server could be reached{}: {}", within(*.timed_out), list(.attempts))]
    NoUpstream {
        attempts: Vec<Attempt>,
        /// The connect timeout ran out before every server was tried.
        timed_out: Option<Duration>,
    },
    /// Our side or the configuration: the route's interface, or no socket to be had.
    #[error(transparent)]
    Ours(ConnectError),
}

fn within(t: Option<Duration>) -> String {
    t.map(|t| format!(" within the connect timeout of {t:?}"))
        .unwrap_or_default()
}

fn list(attempts: &[Attempt]) -> String {
    if attempts.is_empty() {
        return "no server was tried".to_owned();
    }
    let all: Vec<String> = attempts.iter().map(Attempt::to_string).collect();
    all.join("; ")
}

/// Dials the set of a route or match for `client`: resolves its entries, orders the servers by
/// the balance (up primaries, up backups, then the ones marked down as a last resort) and tries
/// them in turn until one connects, all within `connect_timeout`. Each attempt gets an equal
/// share of the time left (the last one all of it), so one black-holed server cannot use up the
/// time of the others. A refused, unreachable or timed-out server is marked down (passive check).
pub async fn dial(
    set: &Upstreams,
    client: SocketAddr,
    opts: &DialOptions<'_>,
) -> Result<Dialed, DialError> {
    let deadline = Instant::now() + opts.connect_timeout;
    let no_time = || DialError::NoUpstream {
        attempts: Vec::new(),
        timed_out: Some(opts.connect_timeout),
    };
    let targets = tokio::time::timeout(opts.connect_timeout, set.resolve())
        .await
        .map_err(|_| no_time())??;
    let plan = set.plan(&targets, client.ip());
    let checks = set.spec().health_check.is_some();
    let mut attempts = Vec::new();
    for (i, target) in plan.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(DialError::NoUpstream {
                attempts,
                timed_out: Some(opts.connect_timeout),
            });
        }
        let share = left / (plan.len() - i) as u32;
        match connect(target.addr, opts.interface, share).await {
            Ok(Connected { stream, syscall }) => {
                if syscall.wall >= SLOW_CONNECT {
                    slow_connect(&target.server, syscall);
                }
                target.server.dial_succeeded(checks);
                return Ok(Dialed {
                    stream,
                    addr: target.addr,
                    lease: target.server.lease(),
                    failed: attempts,
                });
            }
            Err(e) if e.is_upstream() => {
                target.server.dial_failed(&e.to_string());
                attempts.push(Attempt {
                    server: target.server.name().to_owned(),
                    error: e,
                });
            }
            Err(e) => {
                if let ConnectError::Local { err, .. } = &e {
                    if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                        port_search(&target.server, || {
                            "no local port was free (connect: EADDRNOTAVAIL)".to_owned()
                        });
                    }
                }
                return Err(DialError::Ours(e));
            }
        }
    }
    Err(DialError::NoUpstream {
        attempts,
        timed_out: None,
    })
}

/// A connected upstream socket, and how long its connect() system call took: the kernel
/// chooses the local port inside it, so a long one is a port search (see [`super::ports`]).
#[derive(Debug)]
pub(super) struct Connected {
    pub stream: TcpStream,
    pub syscall: Timed,
}

/// One TCP connect to `addr` (bound to `interface` if given), at most `limit` long. Also the
/// health checks' connect, so checks go where dials go. The socket is made and connected with
/// socket2 rather than tokio's `TcpSocket::connect` so that the system call alone is timed
/// (two clock reads); tokio then waits for it as `TcpSocket::connect` does.
pub(super) async fn connect(
    addr: SocketAddr,
    interface: Option<&str>,
    limit: Duration,
) -> Result<Connected, ConnectError> {
    let local = |err| ConnectError::Local { addr, err };
    let failed = |err: io::Error| match err.raw_os_error() {
        // No local port left (the port range is full of TIME_WAIT): ours, not the server's.
        Some(libc::EADDRNOTAVAIL) => ConnectError::Local { addr, err },
        _ => ConnectError::Upstream { addr, err },
    };
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    // SOCK_NONBLOCK | SOCK_CLOEXEC in the one socket() call.
    let socket =
        Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP)).map_err(local)?;
    // The upstream's TCP urgent bytes in line, as the client's (see `listen::accept_loop`): the
    // copy path would otherwise drop them. Best effort, as there.
    let _ = socket.set_out_of_band_inline(true);
    if let Some(iface) = interface {
        socket
            .bind_device(Some(iface.as_bytes()))
            .map_err(|err| ConnectError::Interface {
                iface: iface.to_owned(),
                err: if err.raw_os_error() == Some(libc::ENODEV) {
                    io::Error::other("no such interface (ip link lists them)")
                } else {
                    err
                },
            })?;
    }
    let timer = Timer::start();
    let begun = socket.connect(&addr.into());
    let syscall = timer.stop();
    let done = match begun {
        Ok(()) => true,
        // To a peer on this host (a container on a bridge or a veth, loopback) the handshake
        // ran inside connect(), in its softirq: the socket is connected on return. getpeername
        // says so, and spares the wait for writability: an epoll round and a timer, whose
        // registration wakes this thread's own driver (an eventfd write, tokio issue 5207).
        Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => socket.peer_addr().is_ok(),
        Err(err) => return Err(failed(err)),
    };
    let stream = TcpStream::from_std(socket.into()).map_err(local)?;
    if done {
        return Ok(Connected { stream, syscall });
    }
    match tokio::time::timeout(limit, stream.writable()).await {
        Err(_) => return Err(ConnectError::Timeout { addr, after: limit }),
        Ok(Err(err)) => return Err(failed(err)),
        Ok(Ok(())) => {}
    }
    // Writable means connected or failed; SO_ERROR says which.
    if let Some(err) = stream.take_error().map_err(local)? {
        return Err(failed(err));
    }
    Ok(Connected { stream, syscall })
}

/// A connect() slower than [`SLOW_CONNECT`]. Timed on the thread's CPU clock too (while
/// [`ports`] suspects a port search), at least [`SEARCH_CPU`] there: the kernel searched,
/// counted and warned about. Without the CPU time (the first such dial): the thread may only
/// have waited for a CPU on a busy machine, so this dial is not counted; if TIME_WAIT fills the
/// port range, the next 1,000 dials are timed on the CPU clock (and if none searched, no new
/// suspicion starts for 10 s).
fn slow_connect(server: &Server, syscall: Timed) {
    match syscall.cpu {
        Some(cpu) if cpu >= SEARCH_CPU => {
            ports::confirmed();
            port_search(server, || {
                format!(
                    "connect() took {:.1?}, {cpu:.1?} of it on the CPU (the kernel's port \
                     search)",
                    syscall.wall
                )
            });
        }
        Some(_) => {}
        None => {
            if ports::may_suspect() && PortPressure::read().is_some_and(|p| p.explains_slow_dials())
            {
                ports::suspect();
            }
        }
    }
}

/// A dial to `server` was slow in connect() or found no local port: counted and warned about
/// (once per server) when TIME_WAIT sockets fill the port range, the one cause spliced can
/// name. Reads /proc only on such a dial.
fn port_search(server: &Server, seen: impl FnOnce() -> String) {
    let Some(pressure) = PortPressure::read().filter(PortPressure::explains_slow_dials) else {
        return;
    };
    server.port_search(|| pressure.advice(&seen()));
}
