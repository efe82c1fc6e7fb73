//! One connection: the upstream dial, the data path, the idle watchdog, the log line.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    proxied, routing,
    state::{Live, RouteState, Shared},
};
use crate::{
    forward::{self, DataPath, End, Outcome},
    proxy_header,
    registry::{Conn, Failure},
    sockopt,
    upstream::{self, ConnectError, DialError, DialOptions, Lease},
};

/// The failure reason a dial error is counted under.
fn dial_failure(e: &DialError) -> Failure {
    match e {
        DialError::Resolve(_) => Failure::Resolve,
        DialError::NoUpstream { .. } => Failure::NoUpstream,
        DialError::Ours(ConnectError::Interface { .. }) => Failure::Interface,
        DialError::Ours(_) => Failure::Spliced,
    }
}

/// Serves one accepted connection to its end.
pub(super) async fn run(
    mut client: TcpStream,
    peer: SocketAddr,
    route: Arc<RouteState>,
    shared: Arc<Shared>,
    _live: Live,
) {
    let rc = &route.counters;
    let entry = shared.registry.add(&route.route.name, peer);
    let started = Instant::now();
    let opened = tokio::select! {
        r = open(&mut client, peer, &route, &entry.conn) => r,
        () = shared.close_all.cancelled() => {
            rc.fail(Failure::Shutdown);
            return;
        }
    };
    let Some(Opened {
        upstream,
        addr: upstream_addr,
        lease: _lease,
        chosen,
        client: origin,
        via,
    }) = opened
    else {
        return;
    };
    let plan = route.plan_of(chosen.rule);
    let plan = if chosen.mid_skb {
        debug!(route = %route.route.name, "the client kept sending while it was read before the data path: splice, not sockmap");
        plan.without_sockmap()
    } else {
        plan
    };
    // The client's TCP_NODELAY came from the listener (see `listen::accept_loop`).
    let _ = upstream.set_nodelay(true);
    entry
        .conn
        .established(&client, &upstream, upstream_addr, plan.path());
    let routing = (!route.route.matches.is_empty()).then(|| chosen.describe());
    if let Some(text) = &routing {
        entry.conn.routed(text.clone());
    }
    let cancel = shared.close_all.child_token();
    let idled = AtomicBool::new(false);
    let cx = forward::Context {
        sockmap: shared.sockmap.as_deref(),
        send_buffer: shared.send_buffer,
        budget: &route.budget,
        cancel: &cancel,
        route: &route.route.name,
    };
    let (path, mut outcome) = tokio::select! {
        r = forward::carry(plan, &cx, client, upstream) => r,
        () = watchdog(&route, &shared, &entry.conn, &cancel, &idled) => unreachable!("the watchdog never returns"),
    };
    drop(entry);
    // The client's bytes read before the data path took over were its first ones.
    outcome.up += chosen.client_bytes as u64;
    let idled = idled.load(Ordering::Relaxed);
    let ended = Ended {
        peer: origin,
        via,
        upstream: upstream_addr,
        path,
        elapsed: started.elapsed(),
        routing,
    };
    report(&route, ended, outcome, idled);
}

/// A connection set up to its data path.
struct Opened {
    upstream: TcpStream,
    addr: SocketAddr,
    lease: Lease,
    chosen: routing::Chosen,
    /// The client: a trusted front proxy's PROXY header's source, or the peer.
    client: SocketAddr,
    /// The front proxy whose header named the client.
    via: Option<SocketAddr>,
}

/// Reads a trusted front proxy's PROXY header, routes (peeking if the route has matches), dials
/// the chosen upstream and writes to it what must precede the client's bytes: the PROXY header,
/// then the bytes read so far. With sockmap this happens before the sockets enter the map, so
/// those bytes cannot overtake them. `None` when the connection ended here (refused, or the
/// upstream failed; counted and logged).
async fn open(
    client: &mut TcpStream,
    peer: SocketAddr,
    route: &RouteState,
    conn: &Conn,
) -> Option<Opened> {
    let front = proxied::front(client, peer, route, conn).await?;
    // From here on the client is the one the header named.
    let peer = front.client;
    let mut chosen = routing::choose(client, peer, route, front.early).await?;
    chosen.mid_skb |= front.mid_skb;
    let target = route.route.target(chosen.rule)?;
    let opts = DialOptions {
        connect_timeout: target.connect_timeout,
        interface: target.interface,
    };
    // The one dial: the chosen match's server set, or the route's.
    let dialed = upstream::dial(route.upstreams_of(chosen.rule), peer, &opts).await;
    let (mut upstream, addr, lease) = match dialed {
        Ok(d) => {
            let to = d.lease.server().name();
            for failed in &d.failed {
                info!(route = %route.route.name, client = %peer, "upstream server skipped: {failed}; went on to {to}");
            }
            (d.stream, d.addr, d.lease)
        }
        Err(e) => {
            route.counters.fail(dial_failure(&e));
            // Reset, so the client does not take an empty reply for a successful one.
            let _ = sockopt::set_linger_zero(client);
            warn!(
                route = %route.route.name, client = %peer, upstream = %target.upstream,
                "upstream failed: {e}; client connection reset"
            );
            return None;
        }
    };
    let mut first = match target.proxy_protocol {
        Some(version) => {
            let destination = front.destination.or(client.local_addr().ok());
            let origin = proxy_header::Origin {
                source: peer,
                destination: destination.unwrap_or(peer),
            };
            proxy_header(version, origin, &chosen)
        }
        None => Vec::new(),
    };
    chosen.client_bytes = chosen.head.len();
    first.append(&mut chosen.head);
    if !first.is_empty() {
        if let Err(e) = upstream.write_all(&first).await {
            route.counters.fail(Failure::Upstream);
            let _ = sockopt::set_linger_zero(client);
            warn!(
                route = %route.route.name, client = %peer, upstream = %addr,
                "upstream failed: writing the client's first {} bytes: {e}; client connection reset",
                first.len()
            );
            return None;
        }
    }
    Some(Opened {
        upstream,
        addr,
        lease,
        chosen,
        client: peer,
        via: front.via,
    })
}

/// The PROXY header for this connection: the client and the address it connected to (a front
/// proxy's header's, or ours), and for v2 the name the peek saw and the ALPN protocol when the
/// client offered only one (the only case the negotiated one is known without terminating TLS).
fn proxy_header(
    version: proxy_header::Version,
    origin: proxy_header::Origin,
    chosen: &routing::Chosen,
) -> Vec<u8> {
    let seen = chosen.seen.as_ref();
    let alpn = seen
        .filter(|s| s.alpn.len() == 1)
        .map(|s| s.alpn[0].as_str());
    let header_seen = proxy_header::Seen {
        authority: seen.and_then(|s| s.name.as_deref()),
        alpn,
    };
    proxy_header::encode(version, origin, header_seen)
}

/// Cancels the connection once it carried no data either way for the route's `idle_timeout`;
/// never returns.
async fn watchdog(
    route: &RouteState,
    shared: &Shared,
    conn: &Conn,
    cancel: &CancellationToken,
    idled: &AtomicBool,
) {
    if let Some(limit) = route.route.idle_timeout {
        loop {
            let idle = conn.sample(shared.sockmap.as_deref()).idle;
            if idle >= limit {
                idled.store(true, Ordering::Relaxed);
                cancel.cancel();
                break;
            }
            // The earliest the connection can have been idle for `limit`.
            tokio::time::sleep((limit - idle).max(Duration::from_millis(10))).await;
        }
    }
    std::future::pending::<()>().await
}

/// What the log line says of a connection besides its outcome.
struct Ended {
    peer: SocketAddr,
    /// The front proxy whose PROXY header named `peer`.
    via: Option<SocketAddr>,
    upstream: SocketAddr,
    path: DataPath,
    elapsed: Duration,
    /// The match and name routing saw, on routes with matches.
    routing: Option<String>,
}

/// Counts the closed connection and logs its line: info for an ordinary end, warn for ours.
fn report(route: &RouteState, ended: Ended, outcome: Outcome, idled: bool) {
    let rc = &route.counters;
    let Outcome { up, down, end } = outcome;
    rc.closed(ended.path, up, down);
    let idled = idled && matches!(end, End::Shutdown);
    let failure = match &end {
        End::Complete => None,
        End::ClientFailed(_) => Some(Failure::Client),
        End::UpstreamFailed(_) => Some(Failure::Upstream),
        End::Ours(_) => Some(Failure::Spliced),
        End::Shutdown if idled => Some(Failure::IdleTimeout),
        End::Shutdown => Some(Failure::Shutdown),
    };
    if let Some(f) = failure {
        rc.fail(f);
    }
    let end = match (idled, route.route.idle_timeout) {
        (true, Some(t)) => format!("idle timeout: no data either way for {t:?}; both sides reset"),
        _ => end.to_string(),
    };
    let Ended {
        peer,
        via,
        upstream,
        path,
        elapsed,
        routing,
    } = ended;
    let mut routing = routing.unwrap_or_default();
    if let Some(via) = via {
        routing += &format!("{}via={via}", if routing.is_empty() { "" } else { " " });
    }
    let name = &route.route.name;
    macro_rules! log_line {
        ($level:ident) => {
            $level!(
                route = %name, client = %peer, upstream = %upstream, path = %path,
                bytes_up = up, bytes_down = down, duration_ms = elapsed.as_millis() as u64,
                end = %end, "connection closed{}{routing}", if routing.is_empty() { "" } else { ": " }
            )
        };
    }
    match failure {
        None | Some(Failure::Client | Failure::Upstream | Failure::IdleTimeout) => log_line!(info),
        _ => log_line!(warn),
    }
}
