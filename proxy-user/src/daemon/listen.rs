//! Listening sockets (bound here, or handed over by systemd) and the accept loop.
use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpSocket},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use super::{
    connection,
    state::{Live, RouteState, Shared},
    StartError,
};
use crate::{addr::AddrError, config::Route, sockopt, systemd::Inherited};

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

/// A listening socket and the address it is bound to.
pub(super) type Bound = (TcpListener, SocketAddr);

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
    let listener = inherited
        .listener
        .try_clone()
        .and_then(TcpListener::from_std)
        .map_err(fail)?;
    set_inherited_options(&listener);
    let local_addr = listener.local_addr().map_err(fail)?;
    info!(
        "route {}: socket-activated: systemd passed {local_addr} as {:?} (the route's listen \
         address {} is not bound)",
        route.name, inherited.name, route.listen
    );
    Ok((listener, local_addr))
}

async fn bind(route: &Route) -> Result<Bound, ListenError> {
    let addr = *route
        .listen
        .resolve()
        .await?
        .first()
        .ok_or(ListenError::Empty)?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(ListenError::Socket)?;
    socket.set_reuseaddr(true).map_err(ListenError::Socket)?;
    set_inherited_options(&socket);
    socket.bind(addr).map_err(ListenError::Socket)?;
    let listener = socket.listen(1024).map_err(ListenError::Socket)?;
    let local_addr = listener.local_addr().map_err(ListenError::Socket)?;
    Ok((listener, local_addr))
}

/// Accepts until `stop`; each connection follows the route as it was when it was accepted.
pub(super) async fn accept_loop(
    listener: TcpListener,
    route: watch::Receiver<Arc<RouteState>>,
    shared: Arc<Shared>,
    connections: TaskTracker,
    stop: CancellationToken,
) {
    // Set on the listener (`set_inherited_options`), or else per connection below.
    let inherits_nodelay = sockopt::nodelay(&listener).unwrap_or(false);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return,
        };
        // The route as of now: a reload applies to connections accepted after it.
        let route = route.borrow().clone();
        match accepted {
            Ok((client, peer)) => {
                route
                    .counters
                    .total
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if shared.filters.check(&route.route.name, peer.ip()).is_err() {
                    // allow, deny or syn_rate: a connection that did not pass through the XDP
                    // front (loopback, another interface) gets the same answer here, at once.
                    let _ = sockopt::set_linger_zero(&client);
                    continue;
                }
                let Some(live) = Live::enter(&shared, &route, peer) else {
                    let _ = sockopt::set_linger_zero(&client);
                    continue;
                };
                if !inherits_nodelay {
                    let _ = client.set_nodelay(true);
                }
                connections.spawn(connection::run(client, peer, route, shared.clone(), live));
            }
            Err(e) if is_resource_exhaustion(&e) => {
                // EMFILE and friends: the pending connection stays queued; retrying at once
                // would spin. Back off and let live connections finish.
                warn!(route = %route.route.name, "accept: {e}; backing off 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => debug!(route = %route.route.name, "accept: {e}"),
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
