//! One connection: the upstream dial, the data path, the idle watchdog, the log line.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::state::{Live, RouteState, Shared};
use crate::{
    forward::{self, DataPath, End, Outcome},
    registry::{Conn, Failure},
    sockopt,
    upstream::{self, ConnectError, DialError, DialOptions},
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
    client: TcpStream,
    peer: SocketAddr,
    route: Arc<RouteState>,
    shared: Arc<Shared>,
    _live: Live,
) {
    let rc = &route.counters;
    let entry = shared.registry.add(&route.route.name, peer);
    let started = Instant::now();
    let opts = DialOptions {
        connect_timeout: route.route.connect_timeout,
        interface: route.route.interface.as_deref(),
    };
    let dialed = tokio::select! {
        r = upstream::dial(&route.upstreams, peer, &opts) => r,
        () = shared.close_all.cancelled() => {
            rc.fail(Failure::Shutdown);
            return;
        }
    };
    let (upstream, upstream_addr, _lease) = match dialed {
        Ok(d) => {
            let to = d.lease.server().name();
            for failed in &d.failed {
                info!(route = %route.route.name, client = %peer, "upstream server skipped: {failed}; went on to {to}");
            }
            (d.stream, d.addr, d.lease)
        }
        Err(e) => {
            rc.fail(dial_failure(&e));
            // Reset, so the client does not take an empty reply for a successful one.
            let _ = sockopt::set_linger_zero(&client);
            warn!(
                route = %route.route.name, client = %peer, upstream = %route.route.upstream,
                "upstream failed: {e}; client connection reset"
            );
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    entry
        .conn
        .established(&client, &upstream, upstream_addr, route.plan.path());
    let cancel = shared.close_all.child_token();
    let idled = AtomicBool::new(false);
    let cx = forward::Context {
        sockmap: shared.sockmap.as_deref(),
        send_buffer: shared.send_buffer,
        budget: &route.budget,
        cancel: &cancel,
        route: &route.route.name,
    };
    let (path, outcome) = tokio::select! {
        r = forward::carry(route.plan, &cx, client, upstream) => r,
        () = watchdog(&route, &shared, &entry.conn, &cancel, &idled) => unreachable!("the watchdog never returns"),
    };
    drop(entry);
    let idled = idled.load(Ordering::Relaxed);
    let ended = Ended {
        peer,
        upstream: upstream_addr,
        path,
        elapsed: started.elapsed(),
    };
    report(&route, ended, outcome, idled);
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
    upstream: SocketAddr,
    path: DataPath,
    elapsed: Duration,
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
        upstream,
        path,
        elapsed,
    } = ended;
    let name = &route.route.name;
    macro_rules! log_line {
        ($level:ident) => {
            $level!(
                route = %name, client = %peer, upstream = %upstream, path = %path,
                bytes_up = up, bytes_down = down, duration_ms = elapsed.as_millis() as u64,
                end = %end, "connection closed"
            )
        };
    }
    match failure {
        None | Some(Failure::Client | Failure::Upstream | Failure::IdleTimeout) => log_line!(info),
        _ => log_line!(warn),
    }
}
