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
    sync::{OwnedSemaphorePermit, Semaphore},
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
    /// Fires when the grace period is over: live connections are reset.
    close_all: CancellationToken,
}

struct RouteState {
    route: Route,
    path: DataPath,
    local_addr: SocketAddr,
    /// The route's `max_buffered` per direction, from the one global pool (trap 8).
    budget: Budget,
    /// The route's own `max_connections`, if it has one.
    limit: Option<Arc<Semaphore>>,
    counters: Arc<RouteCounters>,
}

/// A running spliced.
pub struct Daemon {
    routes: Vec<Arc<RouteState>>,
    shared: Arc<Shared>,
    stop_accepting: CancellationToken,
    accept_loops: Vec<JoinHandle<()>>,
    connections: TaskTracker,
    control: Option<ControlSocket>,
    metrics: Option<(SocketAddr, JoinHandle<()>)>,
    /// Stops the control socket and the metrics endpoint, once the connections are gone.
    stop_service: CancellationToken,
}

impl Daemon {
    /// Loads and probes the eBPF data path if a route may use it, binds every route's listener
    /// and starts accepting. Must be called inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Daemon, StartError> {
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
        let have_sockmap = sockmap.is_some();
        let shared = Arc::new(Shared {
            sockmap,
            counters: Counters::default(),
            registry: Registry::default(),
            send_buffer: config.send_buffer,
            close_all: CancellationToken::new(),
        });
        let pool = Arc::new(Pool::new(config.max_buffered_total));
        let limit = Arc::new(Semaphore::new(config.max_connections));
        let stop_accepting = CancellationToken::new();
        let connections = TaskTracker::new();
        let mut routes = Vec::new();
        let mut listeners = Vec::new();
        for route in config.routes {
            let listener = bind(&route).await?;
            let local_addr = listener
                .local_addr()
                .map_err(|e| StartError(format!("route {}: {e}", route.name)))?;
            let path = match route.mode {
                Mode::Auto if have_sockmap => DataPath::Sockmap,
                Mode::Auto => DataPath::Splice,
                Mode::Sockmap => DataPath::Sockmap,
                Mode::Splice => DataPath::Splice,
                Mode::Copy => DataPath::Copy,
            };
            info!(
                "route {}: listening on {local_addr}, upstream {}, data path {path}",
                route.name, route.upstream
            );
            let budget = Budget {
                per_direction: route.max_buffered,
                pool: pool.clone(),
            };
            let counters = shared.registry.route(&route.name);
            counters.set_path(path);
            routes.push(Arc::new(RouteState {
                limit: route.max_connections.map(|n| Arc::new(Semaphore::new(n))),
                route,
                path,
                local_addr,
                budget,
                counters,
            }));
            listeners.push(listener);
        }
        let stop_service = CancellationToken::new();
        let metrics = match &config.metrics {
            None => None,
            Some(addr) => {
                let (addr, task) = metrics::start(addr, shared.clone(), stop_service.clone())
                    .await
                    .map_err(|e| StartError(format!("metrics: cannot listen on {addr}: {e}")))?;
                info!("metrics: Prometheus text on http://{addr}/metrics");
                Some((addr, task))
            }
        };
        let control = control::start(&config.control_socket, shared.clone(), stop_service.clone());
        if control.is_some() {
            info!(
                "control socket {}: `spliced status` answers here",
                config.control_socket.display()
            );
        }
        let accept_loops = routes
            .iter()
            .zip(listeners)
            .map(|(route, listener)| {
                tokio::spawn(accept_loop(
                    listener,
                    route.clone(),
                    shared.clone(),
                    limit.clone(),
                    connections.clone(),
                    stop_accepting.clone(),
                ))
            })
            .collect();
        Ok(Daemon {
            routes,
            shared,
            stop_accepting,
            accept_loops,
            connections,
            control,
            metrics,
            stop_service,
        })
    }

    /// The address the metrics endpoint listens on, if it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(a, _)| *a)
    }

    /// The bound address of route `name` (useful with port 0).
    pub fn local_addr(&self, route: &str) -> Option<SocketAddr> {
        self.route(route).map(|r| r.local_addr)
    }

    /// The data path route `name` uses for new connections (what `auto` chose).
    pub fn data_path(&self, route: &str) -> Option<DataPath> {
        self.route(route).map(|r| r.path)
    }

    fn route(&self, name: &str) -> Option<&RouteState> {
        self.routes
            .iter()
            .map(|r| &**r)
            .find(|r| r.route.name == name)
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
        self.stop_accepting.cancel();
        for task in self.accept_loops {
            let _ = task.await;
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

async fn bind(route: &Route) -> Result<TcpListener, StartError> {
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
    socket.listen(1024).map_err(|e| fail(&e))
}

async fn accept_loop(
    listener: TcpListener,
    route: Arc<RouteState>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    connections: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((client, peer)) => {
                shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
                route.counters.total.fetch_add(1, Ordering::Relaxed);
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    route.counters.fail(Failure::MaxConnections);
                    warn!(route = %route.route.name, client = %peer, "connection limit (max_connections) reached: connection refused");
                    let _ = sockopt::set_linger_zero(&client);
                    continue;
                };
                let route_permit = match &route.limit {
                    None => None,
                    Some(l) => match l.clone().try_acquire_owned() {
                        Ok(p) => Some(p),
                        Err(_) => {
                            route.counters.fail(Failure::RouteMaxConnections);
                            warn!(route = %route.route.name, client = %peer, "route connection limit (route max_connections) reached: connection refused");
                            let _ = sockopt::set_linger_zero(&client);
                            continue;
                        }
                    },
                };
                connections.spawn(connection(
                    client,
                    peer,
                    route.clone(),
                    shared.clone(),
                    (permit, route_permit),
                ));
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
    permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
) {
    let counters = &shared.counters;
    let rc = &route.counters;
    counters.active.fetch_add(1, Ordering::Relaxed);
    rc.active.fetch_add(1, Ordering::Relaxed);
    // Counted down on every way out, once the slots are free again: whoever sees the count
    // drop can connect.
    let _active = scopeguard(move || {
        drop(permits);
        counters.active.fetch_sub(1, Ordering::Relaxed);
        rc.active.fetch_sub(1, Ordering::Relaxed);
    });
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

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

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
            // Out of tokio's epoll: the sockets' data wakeups would be spurious (trap 7).
            let (client, upstream) = match (client.into_std(), upstream.into_std()) {
                (Ok(c), Ok(u)) => (c, u),
                (Err(e), _) | (_, Err(e)) => {
                    return (
                        DataPath::Sockmap,
                        Outcome {
                            up: 0,
                            down: 0,
                            end: End::Ours(e),
                        },
                    )
                }
            };
            let outcome = forward::sockmap::run(
                sockmap,
                client,
                upstream,
                shared.send_buffer,
                &route.budget,
                cancel,
            );
            match outcome.await {
                Ok(outcome) => return (DataPath::Sockmap, outcome),
                Err(declined) => {
                    debug!(route = %route.route.name, "sockmap declined the connection ({}); using splice", declined.why);
                    match (
                        TcpStream::from_std(declined.client),
                        TcpStream::from_std(declined.upstream),
                    ) {
                        (Ok(c), Ok(u)) => {
                            let outcome = forward::userspace::run(Kind::Splice, c, u, cancel).await;
                            return (DataPath::Splice, outcome);
                        }
                        (Err(e), _) | (_, Err(e)) => {
                            return (
                                DataPath::Splice,
                                Outcome {
                                    up: 0,
                                    down: 0,
                                    end: End::Ours(e),
                                },
                            )
                        }
                    }
                }
            }
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
