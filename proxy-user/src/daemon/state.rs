//! What the accept loops and connection tasks share, and the route a listener serves.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    config::Route,
    ebpf::Sockmap,
    forward::{Budget, Plan},
    registry::{Failure, Registry, RouteCounters},
    upstream::{CheckOptions, Checker, Upstreams},
    xdp::Filters,
};

/// State every connection task shares.
pub(super) struct Shared {
    /// The loaded verdict program; `None` when no route may use sockmap.
    pub(super) sockmap: Option<Arc<Sockmap>>,
    /// Live connections and per-route counters (status, metrics, idle timeouts).
    pub(super) registry: Arc<Registry>,
    /// SO_SNDBUF of sockmap sockets (trap 9).
    pub(super) send_buffer: Option<usize>,
    /// The global `max_connections` (changed by a reload).
    pub(super) max_connections: AtomicU64,
    /// Live connections across all routes, for `max_connections`.
    pub(super) live: AtomicU64,
    /// Fires when the grace period is over: live connections are reset.
    pub(super) close_all: CancellationToken,
    /// The routes' source rules: the XDP front and the accept-time check.
    pub(super) filters: Arc<Filters>,
}

/// A route as its listener serves it now.
pub(super) struct RouteState {
    pub(super) route: Route,
    /// How its connections are carried (its mode resolved against this kernel).
    pub(super) plan: Plan,
    /// The plan of each match (its own `mode`, or the route's), by index.
    pub(super) match_plans: Vec<Plan>,
    /// The route's `max_buffered` per direction, from the one global pool (trap 8).
    pub(super) budget: Budget,
    pub(super) counters: Arc<RouteCounters>,
    /// The route's upstream servers.
    pub(super) upstreams: Arc<Upstreams>,
    /// Each match's servers, by index.
    pub(super) match_upstreams: Vec<Arc<Upstreams>>,
}

impl RouteState {
    /// Starts the health checks of the route's upstream set and of each match's, each
    /// connecting like its own dials (a match's `interface`, `connect_timeout` and
    /// `proxy_protocol` where it sets them).
    pub(super) fn checkers(&self) -> Vec<Checker> {
        let route = &self.route;
        // A server that expects PROXY headers (v1 or v2: HAProxy, nginx and Postfix accept
        // both) takes a v2 LOCAL header as a check, not as a broken client.
        let own = CheckOptions {
            interface: route.interface.clone(),
            connect_timeout: Some(route.connect_timeout),
            proxy_header: route.proxy_protocol.is_some(),
        };
        let mut checkers = vec![Checker::start(self.upstreams.clone(), own)];
        for (m, set) in route.matches.iter().zip(&self.match_upstreams) {
            let opts = CheckOptions {
                interface: m.interface.clone().or_else(|| route.interface.clone()),
                connect_timeout: Some(m.connect_timeout.unwrap_or(route.connect_timeout)),
                proxy_header: m.proxy_protocol.or(route.proxy_protocol).is_some(),
            };
            checkers.push(Checker::start(set.clone(), opts));
        }
        checkers
    }
}

impl RouteState {
    /// The servers of match `rule` (or, for `None`, the route's).
    pub(super) fn upstreams_of(&self, rule: Option<usize>) -> &Upstreams {
        match rule.and_then(|i| self.match_upstreams.get(i)) {
            Some(set) => set,
            None => &self.upstreams,
        }
    }

    /// The plan of the connections match `rule` (or, for `None`, no match) takes.
    pub(super) fn plan_of(&self, rule: Option<usize>) -> Plan {
        rule.and_then(|i| self.match_plans.get(i).copied())
            .unwrap_or(self.plan)
    }
}

/// One listener and the route its connections follow. A reload swaps the route in place (new
/// connections follow the new one) or stops the listener.
pub(super) struct Slot {
    pub(super) local_addr: SocketAddr,
    pub(super) route: watch::Sender<Arc<RouteState>>,
    pub(super) stop: CancellationToken,
    pub(super) task: JoinHandle<()>,
    /// The health checks of the route's upstream set and of each match's; replaced with them.
    pub(super) checkers: Vec<Checker>,
}

impl Slot {
    /// The route new connections follow.
    pub(super) fn state(&self) -> Arc<RouteState> {
        self.route.borrow().clone()
    }

    /// Stops accepting and waits for the accept loop to end.
    pub(super) async fn close(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// A connection counted as live, globally and for its route; counted out when dropped.
pub(super) struct Live {
    shared: Arc<Shared>,
    counters: Arc<RouteCounters>,
}

impl Live {
    /// Counts a new connection in, or refuses it (counted as failed, logged) when it would take
    /// the daemon past `max_connections` or the route past its own.
    pub(super) fn enter(
        shared: &Arc<Shared>,
        route: &RouteState,
        client: SocketAddr,
    ) -> Option<Live> {
        let name = &route.route.name;
        let all = shared.live.fetch_add(1, Ordering::AcqRel) + 1;
        let live = Live {
            shared: shared.clone(),
            counters: route.counters.clone(),
        };
        let mine = route.counters.active.fetch_add(1, Ordering::AcqRel) + 1;
        if all > shared.max_connections.load(Ordering::Relaxed) {
            route.counters.fail(Failure::MaxConnections);
            warn!(route = %name, client = %client, "connection limit (max_connections) reached: connection refused");
            return None;
        }
        if route
            .route
            .max_connections
            .is_some_and(|max| mine > max as u64)
        {
            route.counters.fail(Failure::RouteMaxConnections);
            warn!(route = %name, client = %client, "route connection limit (route max_connections) reached: connection refused");
            return None;
        }
        Some(live)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.shared.live.fetch_sub(1, Ordering::AcqRel);
        self.counters.active.fetch_sub(1, Ordering::AcqRel);
    }
}
