//! Listening sockets: bound here (one per lane in a steered `SO_REUSEPORT` group where the
//! steering loads, else one), or handed over by systemd.
use std::{io, net::SocketAddr, net::TcpListener};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::info;

use super::StartError;
use crate::{
    addr::AddrError,
    config::Route,
    forward::lanes,
    sockopt,
    steer::{self, Group},
    systemd::Inherited,
    STEER_OBJECT,
};

/// Why a route's listen address could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The address did not resolve.
    #[error(transparent)]
    Resolve(#[from] AddrError),
    /// It resolved to no address.
    #[error("the address resolved to nothing")]
    Empty,
    /// socket, bind or listen failed; the text says what usually causes it.
    #[error("{0}{hint}", hint = bind_hint(.0))]
    Socket(#[source] io::Error),
}

fn bind_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::AddrInUse => " (another process listens there: pick another port)",
        io::ErrorKind::AddrNotAvailable => " (no interface has that address)",
        io::ErrorKind::PermissionDenied => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        _ => "",
    }
}

/// A route's listening sockets and the address they are bound to.
pub(super) struct Bound {
    /// One, or one per lane (a `SO_REUSEPORT` group).
    pub(super) sockets: Vec<TcpListener>,
    /// The group's steering, while it lives.
    pub(super) steer: Option<Group>,
    pub(super) addr: SocketAddr,
}

/// Sets what accepted sockets inherit from their listener (the kernel clones the listener's
/// socket when a handshake completes): one setsockopt per listener instead of one per
/// connection. TCP_NODELAY; and SO_OOBINLINE, so that a client's TCP urgent byte (telnet's and
/// FTP's "synch") is read in line and forwarded like the rest (the copy path's recv drops it
/// otherwise). Set before `listen` on a socket bound here, so that no connection is cloned
/// without them (set in the accept loop, a test connecting at once on a slow VM got a socket
/// without SO_OOBINLINE); connections already queued on a socket systemd passed keep what it
/// had. Best effort: the accept loop sets TCP_NODELAY per connection where the listener lacks it.
fn set_inherited_options(socket: &impl std::os::fd::AsFd) {
    let _ = sockopt::set_nodelay(socket);
    let _ = sockopt::set_urgent_inline(socket);
}

/// The route's listener: a duplicate of the socket systemd passed under the route's name, or
/// else a new one bound to its `listen` address.
pub(super) async fn listener(route: &Route, inherited: &[Inherited]) -> Result<Bound, StartError> {
    let Some(inherited) = inherited.iter().find(|i| i.name == route.name) else {
        return bind(route).await.map_err(|source| StartError::Listen {
            route: route.name.clone(),
            listen: route.listen.to_string(),
            source,
        });
    };
    let fail = |source: io::Error| StartError::Inherited {
        route: route.name.clone(),
        name: inherited.name.clone(),
        source,
    };
    let listener = inherited.listener.try_clone().map_err(fail)?;
    listener.set_nonblocking(true).map_err(fail)?;
    set_inherited_options(&listener);
    let local_addr = listener.local_addr().map_err(fail)?;
    info!(
        "route {}: socket-activated: systemd passed {local_addr} as {:?} (the route's listen \
         address {} is not bound)",
        route.name, inherited.name, route.listen
    );
    Ok(Bound {
        sockets: vec![listener],
        steer: None,
        addr: local_addr,
    })
}

async fn bind(route: &Route) -> Result<Bound, ListenError> {
    let addr = *route
        .listen
        .resolve()
        .await?
        .first()
        .ok_or(ListenError::Empty)?;
    // Bound without SO_REUSEPORT first: a port anything else holds (a second spliced too,
    // which could otherwise join the group) fails here, and port 0 becomes a real one.
    let probe = socket(addr, false).map_err(ListenError::Socket)?;
    let addr = probe
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| ListenError::Socket(io::Error::other("the bound socket has no address")))?;
    let Some(group) = steer_group(&route.name, addr.port()) else {
        probe.listen(1024).map_err(ListenError::Socket)?;
        return Ok(Bound {
            sockets: vec![probe.into()],
            steer: None,
            addr,
        });
    };
    drop(probe);
    let sockets = (0..lanes::planned())
        .map(|_| {
            let s = socket(addr, true)?;
            s.listen(1024)?;
            Ok(TcpListener::from(s))
        })
        .collect::<io::Result<Vec<_>>>()
        .map_err(ListenError::Socket)?;
    let steer = fill(group, &sockets, &route.name);
    Ok(Bound {
        sockets,
        steer,
        addr,
    })
}

/// A non-blocking socket bound to `addr` with the options its connections inherit.
fn socket(addr: SocketAddr, reuseport: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    set_inherited_options(&socket);
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// The steering's slot for `port`, where there is more than one lane and the program loads.
fn steer_group(route: &str, port: u16) -> Option<Group> {
    if lanes::planned() < 2 {
        return None;
    }
    let steer = steer::get(STEER_OBJECT)
        .inspect_err(|e| info!("route {route}: accepting on one socket: {e}"))
        .ok()?;
    steer
        .reserve(port)
        .inspect_err(|e| info!("route {route}: accepting on one socket: {e}"))
        .ok()
}

/// Puts the group's sockets into the steering; without it, the kernel's hash spreads the
/// connections over the lanes.
fn fill(mut group: Group, sockets: &[TcpListener], route: &str) -> Option<Group> {
    group
        .fill(sockets)
        .inspect_err(|e| info!("route {route}: the accept steering failed: {e}"))
        .ok()
        .map(|()| group)
}
