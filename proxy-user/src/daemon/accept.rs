//! The accept loops: on the shared runtime for a route with one listening socket; on the lanes,
//! one per socket, for a route bound as a steered group (`crate::steer`), whose connections then
//! run start to end on the lane that accepted them.
use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use super::{
    connection,
    listen::Bound,
    state::{Live, RouteState, Shared},
};
use crate::{forward::lanes, sockopt, steer};

/// What every accept loop of a route shares.
#[derive(Clone)]
pub(super) struct Accepting {
    pub(super) route: watch::Receiver<Arc<RouteState>>,
    pub(super) shared: Arc<Shared>,
    pub(super) connections: TaskTracker,
}

/// Accepts on `bound`'s sockets until `stop`; each connection follows the route as it was when
/// it was accepted. Returns once every socket is closed.
pub(super) async fn accept_loop(bound: Bound, with: Accepting, stop: CancellationToken) {
    let Bound {
        mut sockets,
        steer: group,
        ..
    } = bound;
    if sockets.len() == 1 {
        let socket = sockets.remove(0);
        accept_on(socket, with, None, stop).await;
        return;
    }
    // Until the lanes run (they start after the privilege drop), this runtime accepts on every
    // socket of the group; then each moves to its lane, its queued connections with it.
    let until = stop.child_token();
    let early: Vec<_> = sockets
        .into_iter()
        .map(|s| tokio::spawn(accept_on(s, with.clone(), None, until.clone())))
        .collect();
    let handles = tokio::select! {
        handles = lanes::started() => Some(handles),
        () = stop.cancelled() => None,
    };
    until.cancel();
    let mut sockets = Vec::new();
    for task in early {
        sockets.extend(task.await.ok().flatten());
    }
    let Some(handles) = handles else { return };
    let steering = group.as_ref().map(steer::Group::steer);
    if let Some(steer) = steering {
        steer.set_lanes(handles.len());
    }
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| {
            let lane = steering.map(|s| (s, i));
            handles[i % handles.len()].spawn(accept_on(socket, with.clone(), lane, stop.clone()))
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    // The group leaves the steering's maps only now, with its sockets closed.
    drop(group);
}

/// Accepts on `socket` in the runtime it runs on until `stop`, then hands the socket back.
/// `lane`: the steering and this lane's index, to count its connections.
async fn accept_on(
    socket: std::net::TcpListener,
    with: Accepting,
    lane: Option<(&'static steer::Steer, usize)>,
    stop: CancellationToken,
) -> Option<std::net::TcpListener> {
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            warn!(route = %with.route.borrow().route.name, "cannot accept: {e}");
            return None;
        }
    };
    // Set on the listener (`listen::set_inherited_options`), or else per connection below.
    let inherits_nodelay = sockopt::nodelay(&listener).unwrap_or(false);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return listener.into_std().ok(),
        };
        // The route as of now: a reload applies to connections accepted after it.
        let route = with.route.borrow().clone();
        match accepted {
            Ok((client, peer)) => {
                if !inherits_nodelay {
                    let _ = client.set_nodelay(true);
                }
                admit(client, peer, route, &with, lane);
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

/// Counts an accepted connection and runs it, unless a filter or a limit turns it away.
fn admit(
    client: TcpStream,
    peer: SocketAddr,
    route: Arc<RouteState>,
    with: &Accepting,
    lane: Option<(&'static steer::Steer, usize)>,
) {
    route
        .counters
        .total
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if with
        .shared
        .filters
        .check(&route.route.name, peer.ip())
        .is_err()
    {
        // allow, deny or syn_rate: a connection that did not pass through the XDP front
        // (loopback, another interface) gets the same answer here, at once.
        let _ = sockopt::set_linger_zero(&client);
        return;
    }
    let Some(live) = Live::enter(&with.shared, &route, peer) else {
        let _ = sockopt::set_linger_zero(&client);
        return;
    };
    let shared = with.shared.clone();
    // Boxed: the connection's future is about 6 KiB, and spawning moved it whole three times
    // or so (`memmove` was 0.5 % of the daemon's CPU per short connection); a box moves once.
    match lane {
        None => with
            .connections
            .spawn(Box::pin(connection::run(client, peer, route, shared, live))),
        Some((steer, i)) => {
            let on_lane = steer.enter(i);
            with.connections.spawn(Box::pin(async move {
                let _on_lane = on_lane;
                connection::run(client, peer, route, shared, live).await;
            }))
        }
    };
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
