//! The daemon: loads the data path, binds the routes' listeners, accepts, reloads, and stops
//! with a grace period.
//!
//! - [`state`]: what the accept loops and connection tasks share;
//! - [`listen`]: listeners (bound, or handed over by systemd) and the accept loop;
//! - [`connection`]: one connection, from the dial to its log line;
//! - [`proxied`]: the PROXY header of a trusted front proxy (`accept_proxy`);
//! - [`reload`]: SIGHUP, as a pure plan and the step that applies it.
use std::{
    collections::HashSet,
    io,
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    config::{Config, Mode, Route},
    ebpf::{Sockmap, Unavailable},
    forward::{Budget, DataPath, Plan, Pool},
    metrics,
    registry::Registry,
    status::{self, ControlSocket},
    systemd::Inherited,
    upstream::Upstreams,
    xdp::{Filters, RouteRules, XdpError},
    XDP_OBJECT,
};

mod accept;
mod connection;
mod listen;
mod proxied;
mod reads_by;
mod reload;
mod routing;
mod state;

pub use listen::ListenError;
pub use reload::ReloadSummary;
use state::{RouteState, Shared, Slot};

/// Why the daemon could not start, or a reload could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A route asks for sockmap and the kernel cannot run it.
    #[error(
        "route {route}: mode sockmap cannot work here: {source}; use mode auto, splice or copy"
    )]
    Sockmap {
        route: String,
        #[source]
        source: Box<Unavailable>,
    },
    /// A reload adds a sockmap route to a daemon that did not load the program at start.
    #[error(
        "route {route}: mode sockmap needs the eBPF program, which this daemon did not load (no \
         route used it at start, or the kernel refused it); restart spliced, or use mode auto, \
         splice or copy"
    )]
    NotLoaded { route: String },
    /// A route's listen address could not be bound.
    #[error("route {route}: cannot listen on {listen}: {source}")]
    Listen {
        route: String,
        listen: String,
        #[source]
        source: ListenError,
    },
    /// The socket systemd passed for a route is unusable.
    #[error("route {route}: the socket systemd passed as {name:?}: {source}")]
    Inherited {
        route: String,
        name: String,
        #[source]
        source: io::Error,
    },
    /// The XDP front could not be loaded, attached or updated.
    #[error(transparent)]
    Xdp(#[from] XdpError),
    /// The metrics endpoint could not be bound.
    #[error("metrics: cannot listen on {addr}: {source}")]
    Metrics {
        addr: String,
        #[source]
        source: io::Error,
    },
}

/// A running spliced.
pub struct Daemon {
    slots: Vec<Slot>,
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    connections: TaskTracker,
    control: Option<ControlSocket>,
    metrics: Option<(SocketAddr, JoinHandle<()>)>,
    /// Stops the control socket and the metrics endpoint, once the connections are gone.
    stop_service: CancellationToken,
    /// The configuration running now.
    config: Config,
    /// Listening sockets systemd handed over, by name: a route of that name takes a duplicate
    /// instead of binding (so a route removed and added again by reloads gets it back).
    inherited: Vec<Inherited>,
}

impl Daemon {
    /// Loads and probes the eBPF data path if a route may use it, binds every route's listener
    /// and starts accepting. Must be called inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Daemon, StartError> {
        Daemon::start_with(config, Vec::new()).await
    }

    /// [`Daemon::start`] with listening sockets handed over by systemd (socket activation): the
    /// route named like a socket accepts on it instead of binding its `listen` address.
    pub async fn start_with(
        config: Config,
        inherited: Vec<Inherited>,
    ) -> Result<Daemon, StartError> {
        let inherited = match_inherited(inherited, &config.routes);
        let sockmap = data_path(&config).await?.map(Arc::new);
        // Attached (or refused) before anything is bound; the rules follow once the listeners'
        // addresses are known.
        let filters = Arc::new(Filters::start(
            XDP_OBJECT,
            &config.xdp,
            config.xdp_mode,
            &[],
        )?);
        let shared = Arc::new(Shared {
            registry: Arc::new(Registry::new(sockmap.clone()).with_filters(filters.clone())),
            filters,
            sockmap,
            send_buffer: config.send_buffer,
            max_connections: AtomicU64::new(config.max_connections as u64),
            live: AtomicU64::new(0),
            close_all: CancellationToken::new(),
        });
        let mut daemon = Daemon {
            slots: Vec::new(),
            pool: Arc::new(Pool::new(config.max_buffered_total)),
            shared,
            connections: TaskTracker::new(),
            control: None,
            metrics: None,
            stop_service: CancellationToken::new(),
            config: Config::new(Vec::new()),
            inherited,
        };
        let mut listeners = Vec::new();
        for route in &config.routes {
            daemon.plan_for(route)?;
            listeners.push(listen::listener(route, &daemon.inherited).await?);
        }
        let addrs: Vec<SocketAddr> = listeners.iter().map(|b| b.addr).collect();
        daemon.shared.filters.apply(
            XDP_OBJECT,
            &config.xdp,
            config.xdp_mode,
            &route_rules(&config.routes, &addrs),
        )?;
        daemon.start_services(&config).await?;
        for (route, listener) in config.routes.iter().zip(listeners) {
            let slot = daemon.open(route.clone(), listener);
            daemon.slots.push(slot);
        }
        daemon.publish_upstreams();
        daemon.config = config;
        Ok(daemon)
    }

    /// The metrics endpoint and the control socket.
    async fn start_services(&mut self, config: &Config) -> Result<(), StartError> {
        let registry = &self.shared.registry;
        if let Some(addr) = &config.metrics {
            let (addr, task) = metrics::start(addr, registry.clone(), self.stop_service.clone())
                .await
                .map_err(|source| StartError::Metrics {
                    addr: addr.to_string(),
                    source,
                })?;
            info!("metrics: Prometheus text on http://{addr}/metrics");
            self.metrics = Some((addr, task));
        }
        tokio::spawn(report_refusals(
            self.shared.filters.clone(),
            self.stop_service.clone(),
        ));
        let path = &config.control_socket;
        self.control = status::start(path, registry.clone(), self.stop_service.clone());
        if self.control.is_some() {
            info!(
                "control socket {}: `spliced status` answers here",
                path.display()
            );
        }
        Ok(())
    }

    /// How a route's connections are carried: what its mode asks for, `auto` resolved by
    /// whether the eBPF program is loaded.
    fn plan_for(&self, route: &Route) -> Result<Plan, StartError> {
        for m in &route.matches {
            self.plan_of(route, m.mode.unwrap_or(route.mode))?;
        }
        self.plan_of(route, route.mode)
    }

    fn plan_of(&self, route: &Route, mode: Mode) -> Result<Plan, StartError> {
        let have_sockmap = self.shared.sockmap.is_some();
        Ok(match mode {
            Mode::Auto if have_sockmap => Plan::CopyThenSockmap,
            Mode::Auto => Plan::Splice,
            Mode::Sockmap if have_sockmap => Plan::Sockmap,
            Mode::Sockmap => {
                return Err(StartError::NotLoaded {
                    route: route.name.clone(),
                })
            }
            Mode::Splice => Plan::Splice,
            Mode::Copy => Plan::Copy,
        })
    }

    /// The state of a route whose [`Daemon::plan_for`] was checked (a sockmap route without
    /// the program would get splice).
    fn state(&self, route: Route) -> Arc<RouteState> {
        let plan = self.plan_for(&route).unwrap_or(Plan::Splice);
        let match_plans = route
            .matches
            .iter()
            .map(|m| {
                self.plan_of(&route, m.mode.unwrap_or(route.mode))
                    .unwrap_or(Plan::Splice)
            })
            .collect();
        let counters = self.shared.registry.route(&route.name);
        counters.set_path(plan.path());
        let registry = &self.shared.registry;
        let upstreams = Upstreams::new(
            route.name.as_str(),
            route.upstream.clone(),
            registry.servers(),
        );
        let match_upstreams = route
            .matches
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let scope = format!("{}.match[{i}]", route.name);
                Arc::new(Upstreams::new(
                    scope,
                    m.upstream.clone(),
                    registry.servers(),
                ))
            })
            .collect();
        Arc::new(RouteState {
            upstreams: Arc::new(upstreams),
            match_upstreams,
            budget: Budget {
                per_direction: route.max_buffered,
                pool: self.pool.clone(),
            },
            route,
            plan,
            match_plans,
            counters,
        })
    }

    /// Starts accepting on `listener` for `route`.
    fn open(&self, route: Route, bound: listen::Bound) -> Slot {
        let local_addr = bound.addr;
        let state = self.state(route);
        info!(
            "route {}: listening on {local_addr}, upstream {}{}, data path {}",
            state.route.name,
            state.route.upstream_text(),
            match state.route.matches.len() {
                0 => String::new(),
                n => format!(", {n} match(es) routed by the first bytes"),
            },
            state.plan.path()
        );
        match (bound.sockets.len(), &bound.steer) {
            (1, _) => {}
            (n, Some(_)) => info!(
                "route {}: accepting on {n} lanes, each connection on the lane of the core that \
                 took its SYN unless that lane is busier",
                state.route.name
            ),
            (n, None) => info!(
                "route {}: accepting on {n} lanes, unsteered",
                state.route.name
            ),
        }
        let checkers = state.checkers();
        let (tx, rx) = watch::channel(state);
        let stop = CancellationToken::new();
        let with = accept::Accepting {
            route: rx,
            shared: self.shared.clone(),
            connections: self.connections.clone(),
        };
        let task = tokio::spawn(accept::accept_loop(bound, with, stop.clone()));
        Slot {
            local_addr,
            route: tx,
            stop,
            task,
            checkers,
        }
    }

    /// Lets status and metrics see the upstream sets of the routes running now, each match's
    /// own set included.
    fn publish_upstreams(&self) {
        let mut sets = Vec::new();
        for slot in &self.slots {
            let state = slot.state();
            sets.push(state.upstreams.clone());
            sets.extend(state.match_upstreams.iter().cloned());
        }
        self.shared.registry.set_upstreams(sets);
    }

    /// Prepares for running as `uid`/`gid` (see [`crate::privdrop`]): the control socket
    /// becomes theirs, so the daemon can still remove it at exit.
    pub fn hand_over_to(&self, uid: u32, gid: u32) -> io::Result<()> {
        match &self.control {
            Some(c) => c.chown(uid, gid),
            None => Ok(()),
        }
    }

    /// Whether the eBPF program is loaded (some route may use sockmap).
    pub fn has_sockmap(&self) -> bool {
        self.shared.sockmap.is_some()
    }

    /// Whether the XDP front is attached somewhere (its maps are updated at reloads).
    pub fn has_xdp(&self) -> bool {
        !self.shared.filters.interfaces().is_empty()
    }

    /// The address the metrics endpoint listens on, if it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(a, _)| *a)
    }

    /// The bound address of route `name` (useful with port 0).
    pub fn local_addr(&self, route: &str) -> Option<SocketAddr> {
        self.slot(route).map(|s| s.local_addr)
    }

    /// The data path route `name` uses for new connections (what `auto` chose).
    pub fn data_path(&self, route: &str) -> Option<DataPath> {
        self.slot(route).map(|s| s.state().plan.path())
    }

    fn slot(&self, name: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.state().route.name == name)
    }

    /// Stops accepting, lets live connections run for `grace`, then resets the ones left.
    /// The eBPF program and maps are released when the last connection is gone.
    pub async fn shutdown(self, grace: Duration) {
        for slot in self.slots {
            slot.close().await;
        }
        self.connections.close();
        let live = self.connections.len();
        if live > 0 {
            info!("stopped accepting; waiting up to {grace:?} for {live} live connection(s)");
        }
        if tokio::time::timeout(grace, self.connections.wait())
            .await
            .is_err()
        {
            warn!(
                "grace period of {grace:?} over: resetting {} connection(s)",
                self.connections.len()
            );
            self.shared.close_all.cancel();
            self.connections.wait().await;
        }
        self.stop_service.cancel();
        self.shared.filters.detach();
        if let Some((_, task)) = self.metrics {
            let _ = task.await;
        }
        if let Some(control) = self.control {
            control.stop().await;
        }
        info!("stopped");
    }
}

/// The routes' rules with the addresses their listeners are bound to (`addrs`, in route order).
fn route_rules(routes: &[Route], addrs: &[SocketAddr]) -> Vec<RouteRules> {
    routes
        .iter()
        .zip(addrs)
        .map(|(r, a)| RouteRules {
            name: r.name.clone(),
            listen: vec![*a],
            rules: r.rules.clone(),
        })
        .collect()
}

/// Logs the XDP front's drops every few seconds (each route at most once per
/// [`crate::xdp::LOG_INTERVAL`]) until `stop`.
async fn report_refusals(filters: Arc<Filters>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => filters.report(),
            () = stop.cancelled() => return,
        }
    }
}

/// Keeps the first socket of each name systemd passed, warning about duplicates and about names
/// no route has (kept for a reload that adds such a route).
fn match_inherited(mut inherited: Vec<Inherited>, routes: &[Route]) -> Vec<Inherited> {
    let mut seen = HashSet::new();
    inherited.retain(|i| {
        let first = seen.insert(i.name.clone());
        if !first {
            warn!(
                "socket activation: a second socket is named {:?}; only the first is used",
                i.name
            );
        }
        first
    });
    for i in &inherited {
        if !routes.iter().any(|r| r.name == i.name) {
            warn!(
                "socket activation: socket {:?} ({}) matches no route name; kept for a reload \
                 that adds a route of that name",
                i.name,
                i.listener
                    .local_addr()
                    .map_or("?".to_owned(), |a| a.to_string())
            );
        }
    }
    inherited
}

/// Loads and probes the verdict program when a route may use it. `None`: no route may, or it
/// failed and every such route is `auto` (which then uses splice).
async fn data_path(config: &Config) -> Result<Option<Sockmap>, StartError> {
    let wants = |r: &&Route| r.modes().any(|m| matches!(m, Mode::Auto | Mode::Sockmap));
    if !config.routes.iter().any(|r| wants(&r)) {
        return Ok(None);
    }
    match Sockmap::load_and_probe().await {
        Ok(s) => {
            info!("data path sockmap: verdict program loaded, probe passed (load, attach, insert, early-bytes flush, a byte each way, a held byte read back)");
            Ok(Some(s))
        }
        Err(why) => {
            if let Some(r) = config
                .routes
                .iter()
                .find(|r| r.modes().any(|m| m == Mode::Sockmap))
            {
                return Err(StartError::Sockmap {
                    route: r.name.clone(),
                    source: Box::new(why),
                });
            }
            warn!("sockmap unavailable, auto routes use splice(2): {why}");
            Ok(None)
        }
    }
}
