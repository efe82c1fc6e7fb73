//! The daemon: listeners, accept loops, upstream dials, the choice of data path per connection,
//! the per-connection log line, and shutdown with a grace period.
use std::{
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{
    config::{Config, Mode, Route},
    control::{self, ControlSocket},
    forward::{
        self,
        sockmap::{Budget, Pool},
        userspace::Kind,
        End, Outcome,
    },
    metrics,
    registry::{Failure, Registry, RouteCounters},
    sockmap::Sockmap,
    sockopt,
    systemd::Inherited,
};

/// The data path that carries a connection's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPath {
    /// sk_skb verdict redirect between the two sockets; no payload crosses userspace.
    Sockmap,
    /// splice(2) through a pipe.
    Splice,
    /// A userspace buffer.
    Copy,
}

impl std::fmt::Display for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataPath::Sockmap => "sockmap",
            DataPath::Splice => "splice",
            DataPath::Copy => "copy",
        })
    }
}

/// Counters of a running daemon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections live now.
    pub active: u64,
    /// Connections whose upstream dial failed.
    pub upstream_failed: u64,
    /// Connections carried by sockmap.
    pub sockmap: u64,
    /// Connections carried by splice (chosen, or fallen back to).
    pub splice: u64,
    /// Connections carried by copy.
    pub copy: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    active: AtomicU64,
    upstream_failed: AtomicU64,
    sockmap: AtomicU64,
    splice: AtomicU64,
    copy: AtomicU64,
}

/// Error starting the daemon: names the route and what to change.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

/// State every connection task shares.
pub(crate) struct Shared {
    pub(crate) sockmap: Option<Sockmap>,
    counters: Counters,
    /// Live connections and per-route counters (status, metrics, idle timeouts).
    pub(crate) registry: Registry,
    send_buffer: Option<usize>,
    /// The global `max_connections` (changed by a reload).
    max_connections: AtomicU64,
    /// Fires when the grace period is over: live connections are reset.
    close_all: CancellationToken,
}

struct RouteState {
    route: Route,
    path: DataPath,
    /// The route's `max_buffered` per direction, from the one global pool (trap 8).
    budget: Budget,
    counters: Arc<RouteCounters>,
}

/// One listener and the route its connections follow. A reload swaps the route in place (new
/// connections follow the new one) or stops the listener.
struct Slot {
    local_addr: SocketAddr,
    route: watch::Sender<Arc<RouteState>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Slot {
    fn state(&self) -> Arc<RouteState> {
        self.route.borrow().clone()
    }
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
        mut inherited: Vec<Inherited>,
    ) -> Result<Daemon, StartError> {
        let mut seen = std::collections::HashSet::new();
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
            if !config.routes.iter().any(|r| r.name == i.name) {
                warn!(
                    "socket activation: socket {:?} ({}) matches no route name; kept for a \
                     reload that adds a route of that name",
                    i.name,
                    i.listener
                        .local_addr()
                        .map_or("?".to_owned(), |a| a.to_string())
                );
            }
        }
        let wants_sockmap = config
            .routes
            .iter()
            .any(|r| matches!(r.mode, Mode::Auto | Mode::Sockmap));
        let sockmap = if wants_sockmap {
            match load_sockmap().await {
                Ok(s) => {
                    info!("data path sockmap: verdict program loaded, probe passed (load, attach, insert, early-bytes flush, a byte each way, a held byte read back)");
                    Some(s)
                }
                Err(why) => {
                    if let Some(r) = config.routes.iter().find(|r| r.mode == Mode::Sockmap) {
                        return Err(StartError(format!(
                            "route {}: mode sockmap cannot work here: {why}; use mode auto, splice or copy",
                            r.name
                        )));
                    }
                    warn!("sockmap unavailable, auto routes use splice(2): {why}");
                    None
                }
            }
        } else {
            None
        };
        let shared = Arc::new(Shared {
            sockmap,
            counters: Counters::default(),
            registry: Registry::default(),
            send_buffer: config.send_buffer,
            max_connections: AtomicU64::new(config.max_connections as u64),
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
            listeners.push(daemon.listener(route).await?);
        }
        if let Some(addr) = &config.metrics {
            let (addr, task) =
                metrics::start(addr, daemon.shared.clone(), daemon.stop_service.clone())
                    .await
                    .map_err(|e| StartError(format!("metrics: cannot listen on {addr}: {e}")))?;
            info!("metrics: Prometheus text on http://{addr}/metrics");
            daemon.metrics = Some((addr, task));
        }
        daemon.control = control::start(
            &config.control_socket,
            daemon.shared.clone(),
            daemon.stop_service.clone(),
        );
        if daemon.control.is_some() {
            info!(
                "control socket {}: `spliced status` answers here",
                config.control_socket.display()
            );
        }
        for route in &config.routes {
            daemon.path_for(route).map_err(StartError)?;
        }
        for (route, listener) in config.routes.iter().zip(listeners) {
            let slot = daemon.open(route.clone(), listener);
            daemon.slots.push(slot);
        }
        daemon.config = config;
        Ok(daemon)
    }

    /// The data path a route gets: what its mode asks for, `auto` resolved by whether the eBPF
    /// program is loaded.
    fn path_for(&self, route: &Route) -> Result<DataPath, String> {
        let have_sockmap = self.shared.sockmap.is_some();
        Ok(match route.mode {
            Mode::Auto if have_sockmap => DataPath::Sockmap,
            Mode::Auto => DataPath::Splice,
            Mode::Sockmap if have_sockmap => DataPath::Sockmap,
            Mode::Sockmap => {
                return Err(format!(
                    "route {}: mode sockmap needs the eBPF program, which this daemon did not \
                     load (no route used it at start, or the kernel refused it); restart \
                     spliced, or use mode auto, splice or copy",
                    route.name
                ))
            }
            Mode::Splice => DataPath::Splice,
            Mode::Copy => DataPath::Copy,
        })
    }

    /// The state of a route whose [`Daemon::path_for`] was checked (a sockmap route without
    /// the program would get splice).
    fn state(&self, route: Route) -> Arc<RouteState> {
        let path = self.path_for(&route).unwrap_or(DataPath::Splice);
        let counters = self.shared.registry.route(&route.name);
        counters.set_path(path);
        Arc::new(RouteState {
            budget: Budget {
                per_direction: route.max_buffered,
                pool: self.pool.clone(),
            },
            route,
            path,
            counters,
        })
    }

    /// The route's listener: a duplicate of the socket systemd passed under the route's name,
    /// or else a new one bound to its `listen` address.
    async fn listener(&self, route: &Route) -> Result<(TcpListener, SocketAddr), StartError> {
        let Some(inherited) = self.inherited.iter().find(|i| i.name == route.name) else {
            return bind(route).await;
        };
        let fail = |e: io::Error| {
            StartError(format!(
                "route {}: the socket systemd passed as {:?}: {e}",
                route.name, inherited.name
            ))
        };
        let listener = inherited
            .listener
            .try_clone()
            .and_then(TcpListener::from_std)
            .map_err(fail)?;
        let local_addr = listener.local_addr().map_err(fail)?;
        info!(
            "route {}: socket-activated: systemd passed {local_addr} as {:?} (the route's listen \
             address {} is not bound)",
            route.name, inherited.name, route.listen
        );
        Ok((listener, local_addr))
    }

    /// Starts accepting on `listener` (bound to `local_addr`) for `route`.
    fn open(&self, route: Route, (listener, local_addr): (TcpListener, SocketAddr)) -> Slot {
        let state = self.state(route);
        info!(
            "route {}: listening on {local_addr}, upstream {}, data path {}",
            state.route.name, state.route.upstream, state.path
        );
        let (tx, rx) = watch::channel(state);
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            listener,
            rx,
            self.shared.clone(),
            self.connections.clone(),
            stop.clone(),
        ));
        Slot {
            local_addr,
            route: tx,
            stop,
            task,
        }
    }

    /// Applies a new configuration (SIGHUP): new routes start, removed routes stop accepting,
    /// changed routes apply to new connections; established connections are untouched. A route
    /// keeps its listener when its listen address is unchanged (matched by name, or by address
    /// when the name changed). Nothing changes unless every new listener could be bound; then
    /// the errors are returned and the old configuration stays.
    ///
    /// Top-level keys that only take effect at start (`send_buffer`, `max_buffered_total`,
    /// `control_socket`, `metrics`) are reported as warnings when changed; `max_connections`
    /// and `grace_period` apply at once.
    pub async fn reload(&mut self, config: Config) -> Result<ReloadSummary, Vec<String>> {
        let mut errors = Vec::new();
        // Which old slot each new route reuses.
        let mut reuse: Vec<Option<usize>> = Vec::new();
        let mut taken = vec![false; self.slots.len()];
        for route in &config.routes {
            if let Err(e) = self.path_for(route) {
                errors.push(e);
            }
            let same_listen = |i: usize| {
                let old = &self.config.routes[i];
                old.listen == route.listen && (route.listen.port != 0 || old.name == route.name)
            };
            let by_name = (0..self.slots.len())
                .find(|&i| !taken[i] && self.config.routes[i].name == route.name && same_listen(i));
            let found =
                by_name.or_else(|| (0..self.slots.len()).find(|&i| !taken[i] && same_listen(i)));
            if let Some(i) = found {
                taken[i] = true;
            }
            reuse.push(found);
        }
        let mut fresh = Vec::new();
        for (route, found) in config.routes.iter().zip(&reuse) {
            if found.is_none() {
                match self.listener(route).await {
                    Ok(l) => fresh.push(Some(l)),
                    Err(e) => {
                        errors.push(e.0);
                        fresh.push(None);
                    }
                }
            } else {
                fresh.push(None);
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        for (key, changed) in [
            ("send_buffer", config.send_buffer != self.config.send_buffer),
            (
                "max_buffered_total",
                config.max_buffered_total != self.config.max_buffered_total,
            ),
            (
                "control_socket",
                config.control_socket != self.config.control_socket,
            ),
            ("user", config.user != self.config.user),
            (
                "metrics",
                config.metrics.as_ref().map(ToString::to_string)
                    != self.config.metrics.as_ref().map(ToString::to_string),
            ),
        ] {
            if changed {
                warn!("reload: {key} changed; it takes effect only when spliced restarts");
            }
        }
        self.shared
            .max_connections
            .store(config.max_connections as u64, Ordering::Relaxed);
        let mut summary = ReloadSummary::default();
        let mut old: Vec<Option<Slot>> = self.slots.drain(..).map(Some).collect();
        let old_routes = std::mem::take(&mut self.config.routes);
        let mut slots = Vec::new();
        for ((route, found), listener) in config.routes.iter().zip(reuse).zip(fresh) {
            match (found, listener) {
                (Some(i), _) => {
                    let slot = old[i].take().expect("each old slot is reused once");
                    let before = &old_routes[i];
                    if before.name != route.name || !same_route(before, route) {
                        let state = self.state(route.clone());
                        info!(
                            "route {}: changed; new connections go to {} on data path {}",
                            route.name, route.upstream, state.path
                        );
                        slot.route.send_replace(state);
                        summary.changed += 1;
                    }
                    slots.push(slot);
                }
                (None, Some(listener)) => {
                    slots.push(self.open(route.clone(), listener));
                    summary.added += 1;
                }
                (None, None) => unreachable!("bound above"),
            }
        }
        for (slot, route) in old.into_iter().zip(&old_routes) {
            if let Some(slot) = slot {
                info!(
                    "route {}: removed; stopped listening on {} (live connections carry on)",
                    route.name, slot.local_addr
                );
                slot.stop.cancel();
                let _ = slot.task.await;
                summary.removed += 1;
            }
        }
        self.slots = slots;
        self.config = config;
        Ok(summary)
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
        self.slot(route).map(|s| s.state().path)
    }

    fn slot(&self, name: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.state().route.name == name)
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            accepted: get(&c.accepted),
            active: get(&c.active),
            upstream_failed: get(&c.upstream_failed),
            sockmap: get(&c.sockmap),
            splice: get(&c.splice),
            copy: get(&c.copy),
        }
    }

    /// Stops accepting, lets live connections run for `grace`, then resets the ones left.
    /// The eBPF program and maps are released when the last connection is gone.
    pub async fn shutdown(self, grace: Duration) {
        for slot in &self.slots {
            slot.stop.cancel();
        }
        for slot in self.slots {
            let _ = slot.task.await;
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
        if let Some((_, task)) = self.metrics {
            let _ = task.await;
        }
        if let Some(control) = self.control {
            control.stop().await;
        }
        info!("stopped");
    }
}

/// What a reload changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: usize,
    pub removed: usize,
    pub changed: usize,
}

/// Whether two routes of the same name behave the same (`Route` has no `PartialEq`: endpoints
/// compare by their text).
fn same_route(a: &Route, b: &Route) -> bool {
    a.listen == b.listen
        && a.upstream.to_string() == b.upstream.to_string()
        && a.mode == b.mode
        && a.interface == b.interface
        && a.connect_timeout == b.connect_timeout
        && a.max_buffered == b.max_buffered
        && a.max_connections == b.max_connections
        && a.idle_timeout == b.idle_timeout
}

async fn load_sockmap() -> Result<Sockmap, String> {
    let sockmap = Sockmap::load(crate::EBPF_OBJECT).map_err(|e| e.to_string())?;
    let sockmap = Arc::new(sockmap);
    let probe = sockmap.clone();
    tokio::task::spawn_blocking(move || probe.probe())
        .await
        .map_err(|e| format!("sockmap probe: {e}"))?
        .map_err(|e| e.to_string())?;
    Arc::into_inner(sockmap).ok_or_else(|| "sockmap probe kept a reference".to_owned())
}

async fn bind(route: &Route) -> Result<(TcpListener, SocketAddr), StartError> {
    let fail = |e: &dyn std::fmt::Display| {
        StartError(format!(
            "route {}: cannot listen on {}: {e}",
            route.name, route.listen
        ))
    };
    let addr = *route
        .listen
        .resolve()
        .await
        .map_err(|e| fail(&e))?
        .first()
        .ok_or_else(|| fail(&"the address resolved to nothing"))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| fail(&e))?;
    socket.set_reuseaddr(true).map_err(|e| fail(&e))?;
    socket.bind(addr).map_err(|e| {
        let hint = match e.kind() {
            io::ErrorKind::AddrInUse => " (another process listens there: pick another port)",
            io::ErrorKind::AddrNotAvailable => " (no interface has that address)",
            io::ErrorKind::PermissionDenied => {
                " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            }
            _ => "",
        };
        fail(&format!("{e}{hint}"))
    })?;
    let listener = socket.listen(1024).map_err(|e| fail(&e))?;
    let local_addr = listener.local_addr().map_err(|e| fail(&e))?;
    Ok((listener, local_addr))
}

async fn accept_loop(
    listener: TcpListener,
    route: watch::Receiver<Arc<RouteState>>,
    shared: Arc<Shared>,
    connections: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return,
        };
        // The route as of now: a reload applies to connections accepted after it.
        let route = route.borrow().clone();
        match accepted {
            Ok((client, peer)) => {
                shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
                route.counters.total.fetch_add(1, Ordering::Relaxed);
                let Some(live) = Live::enter(&shared, &route, peer) else {
                    let _ = sockopt::set_linger_zero(&client);
                    continue;
                };
                connections.spawn(connection(client, peer, route, shared.clone(), live));
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

/// A connection counted as live, globally and for its route; counted out when dropped.
struct Live {
    shared: Arc<Shared>,
    counters: Arc<RouteCounters>,
}

impl Live {
    /// Counts a new connection in, or refuses it (counted as failed, logged) when it would take
    /// the daemon past `max_connections` or the route past its own.
    fn enter(shared: &Arc<Shared>, route: &RouteState, client: SocketAddr) -> Option<Live> {
        let name = &route.route.name;
        let all = shared.counters.active.fetch_add(1, Ordering::AcqRel) + 1;
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
        self.shared.counters.active.fetch_sub(1, Ordering::AcqRel);
        self.counters.active.fetch_sub(1, Ordering::AcqRel);
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Why the upstream could not be reached.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("{0}")]
    Resolve(#[from] crate::addr::AddrError),
    #[error("connecting to {addr} failed: {err}")]
    Connect { addr: SocketAddr, err: io::Error },
    #[error("no answer within the connect timeout of {0:?}")]
    Timeout(Duration),
    #[error("interface {iface:?} (route key `interface`): {err}")]
    Interface { iface: String, err: io::Error },
}

impl DialError {
    fn failure(&self) -> Failure {
        match self {
            DialError::Resolve(_) => Failure::Resolve,
            DialError::Connect { .. } => Failure::Connect,
            DialError::Timeout(_) => Failure::ConnectTimeout,
            DialError::Interface { .. } => Failure::Interface,
        }
    }
}

/// Resolves the upstream now (zone names and host names can change between dials) and tries each
/// address in turn, all within the route's connect timeout.
async fn dial(route: &Route) -> Result<(TcpStream, SocketAddr), DialError> {
    let attempt = async {
        let addrs = route.upstream.resolve().await?;
        let mut last = None;
        for addr in addrs {
            match connect(addr, route.interface.as_deref()).await {
                Ok(s) => return Ok((s, addr)),
                Err(e @ DialError::Interface { .. }) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(
            last.unwrap_or(DialError::Resolve(crate::addr::AddrError(format!(
                "{} resolved to no address",
                route.upstream
            )))),
        )
    };
    tokio::time::timeout(route.connect_timeout, attempt)
        .await
        .unwrap_or(Err(DialError::Timeout(route.connect_timeout)))
}

async fn connect(addr: SocketAddr, interface: Option<&str>) -> Result<TcpStream, DialError> {
    let err = |err| DialError::Connect { addr, err };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    if let Some(iface) = interface {
        socket
            .bind_device(Some(iface.as_bytes()))
            .map_err(|err| DialError::Interface {
                iface: iface.to_owned(),
                err: if err.raw_os_error() == Some(libc::ENODEV) {
                    io::Error::other("no such interface (ip link lists them)")
                } else {
                    err
                },
            })?;
    }
    socket.connect(addr).await.map_err(err)
}

async fn connection(
    client: TcpStream,
    peer: SocketAddr,
    route: Arc<RouteState>,
    shared: Arc<Shared>,
    _live: Live,
) {
    let counters = &shared.counters;
    let rc = &route.counters;
    let entry = shared.registry.add(&route.route.name, peer);
    let started = Instant::now();
    let name = &route.route.name;
    let dialed = tokio::select! {
        r = dial(&route.route) => r,
        () = shared.close_all.cancelled() => {
            rc.fail(Failure::Shutdown);
            return;
        }
    };
    let (upstream, upstream_addr) = match dialed {
        Ok(u) => u,
        Err(e) => {
            counters.upstream_failed.fetch_add(1, Ordering::Relaxed);
            rc.fail(e.failure());
            // Reset, so the client does not take an empty reply for a successful one.
            let _ = sockopt::set_linger_zero(&client);
            warn!(
                route = %name, client = %peer, upstream = %route.route.upstream,
                "upstream failed: {e}; client connection reset"
            );
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    entry
        .conn
        .established(&client, &upstream, upstream_addr, route.path);
    let cancel = shared.close_all.child_token();
    let idled = std::sync::atomic::AtomicBool::new(false);
    let watchdog = async {
        if let Some(limit) = route.route.idle_timeout {
            loop {
                let idle = entry.conn.sample(shared.sockmap.as_ref()).idle;
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
    };
    let (path, outcome) = tokio::select! {
        r = carry(&route, &shared, client, upstream, &cancel) => r,
        () = watchdog => unreachable!("the watchdog never returns"),
    };
    drop(entry);
    match path {
        DataPath::Sockmap => &counters.sockmap,
        DataPath::Splice => &counters.splice,
        DataPath::Copy => &counters.copy,
    }
    .fetch_add(1, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let Outcome { up, down, end } = outcome;
    rc.closed(path, up, down);
    let idled = idled.load(Ordering::Relaxed) && matches!(end, End::Shutdown);
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
    macro_rules! log_line {
        ($level:ident) => {
            $level!(
                route = %name, client = %peer, upstream = %upstream_addr, path = %path,
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

/// When an `auto` connection moves from the copy path to sockmap: after 256 KiB, or 100 ms.
/// Measured with 100-byte exchanges on the bench topology: the daemon spends 260-300 µs of CPU
/// per connection through sockmap against 200 µs through copy (kernel networking included;
/// the difference is map updates and psock set-up and tear-down), about what copying 256 KiB
/// costs.
const PROMOTION: forward::userspace::Promotion = forward::userspace::Promotion {
    bytes: 256 * 1024,
    after: Duration::from_millis(100),
};

/// Runs the connection on the route's data path; sockmap hands connections it cannot take to
/// splice.
async fn carry(
    route: &RouteState,
    shared: &Shared,
    client: TcpStream,
    upstream: TcpStream,
    cancel: &CancellationToken,
) -> (DataPath, Outcome) {
    let kind = match (route.path, &shared.sockmap) {
        (DataPath::Sockmap, Some(sockmap)) => {
            // `auto` starts connections on the copy path and moves them to sockmap once they
            // have earned its set-up cost; `sockmap` puts them there at once.
            let promotion = (route.route.mode == Mode::Auto).then_some(PROMOTION);
            return forward::kernel(
                sockmap,
                client,
                upstream,
                shared.send_buffer,
                &route.budget,
                promotion,
                cancel,
                &route.route.name,
            )
            .await;
        }
        (DataPath::Copy, _) => Kind::Copy,
        // Sockmap without a loaded program cannot happen (start refuses it); splice is safe.
        _ => Kind::Splice,
    };
    let path = if kind == Kind::Copy {
        DataPath::Copy
    } else {
        DataPath::Splice
    };
    (
        path,
        forward::userspace::run(kind, client, upstream, cancel).await,
    )
}
