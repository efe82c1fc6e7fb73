//! The live connections and the per-route counters: what `spliced status` lists, what the
//! metrics endpoint serves, and where the idle timeout gets a connection's last activity.
//!
//! Bytes and idle time of a live connection come from the kernel, never from the data path's
//! own loop, because sockmap connections never pass userspace:
//!
//! - sockmap: the verdict program's [`SockStats`] of each socket (`bytes` redirected plus
//!   `passed`, the bytes it held for the daemon to copy; `last_ns`, the `bpf_ktime_get_ns()` of
//!   the last skb), read from the `STATS` map by socket cookie;
//! - every path: `TCP_INFO` of both sockets (`tcpi_bytes_received`, `tcpi_last_data_recv`), which
//!   the TCP stack keeps whatever reads the socket.
//!
//! The idle time is the shorter of the two measures, so a connection whose verdict entry is gone
//! (one sockmap declined and splice carries) is never taken for idle while bytes flow.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use proxy_common::SockStats;

use crate::{
    ebpf::Sockmap,
    forward::DataPath,
    sockopt,
    upstream::{ServerStatus, ServerTable, Upstreams},
    xdp::Filters,
};

/// Why a connection failed, as the metrics label it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// The global `max_connections` was reached; refused at once (reset).
    MaxConnections,
    /// The route's own `max_connections` was reached; refused at once (reset).
    RouteMaxConnections,
    /// The upstream's name or zone did not resolve.
    Resolve,
    /// Every server of the route's upstream set failed (or the connect timeout ran out first).
    NoUpstream,
    /// The route's `interface` could not be used.
    Interface,
    /// The client reset or failed after set-up.
    Client,
    /// The upstream reset or failed after set-up.
    Upstream,
    /// A syscall on spliced's side failed.
    Spliced,
    /// Closed after `idle_timeout` without data.
    IdleTimeout,
    /// Reset when the grace period after SIGTERM/SIGINT ran out.
    Shutdown,
    /// A source in `accept_proxy` sent no valid PROXY header (missing, broken, truncated, too
    /// slow): closed; the reason is in `spliced_proxy_header_total`.
    ProxyHeader,
}

impl Failure {
    /// Every reason, in label order.
    pub const ALL: [Failure; 11] = [
        Failure::MaxConnections,
        Failure::RouteMaxConnections,
        Failure::Resolve,
        Failure::NoUpstream,
        Failure::Interface,
        Failure::Client,
        Failure::Upstream,
        Failure::Spliced,
        Failure::IdleTimeout,
        Failure::Shutdown,
        Failure::ProxyHeader,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::MaxConnections => "max_connections",
            Failure::RouteMaxConnections => "route_max_connections",
            Failure::Resolve => "resolve",
            Failure::NoUpstream => "no_upstream",
            Failure::Interface => "interface",
            Failure::Client => "client",
            Failure::Upstream => "upstream",
            Failure::Spliced => "spliced",
            Failure::IdleTimeout => "idle_timeout",
            Failure::Shutdown => "shutdown",
            Failure::ProxyHeader => "proxy_header",
        }
    }
}

/// Counters of one route, kept across reloads by route name.
#[derive(Default)]
pub struct RouteCounters {
    /// Connections accepted (refused ones included).
    pub total: AtomicU64,
    /// Connections live now.
    pub active: AtomicU64,
    failed: [AtomicU64; Failure::ALL.len()],
    /// Bytes of closed connections, client -> upstream.
    pub bytes_up: AtomicU64,
    /// Bytes of closed connections, upstream -> client.
    pub bytes_down: AtomicU64,
    /// Closed connections per data path: sockmap, splice, copy.
    by_path: [AtomicU64; 3],
    /// The data path new connections of the route use: its index in `DataPath::ALL` plus one; 0 before
    /// the route started.
    path: AtomicU64,
    /// How peeks ended, per [`crate::peek::Outcome`] (routes with matches only).
    peek: [AtomicU64; crate::peek::Outcome::ALL.len()],
    /// Connections each match took, by its index (grows with the route's matches).
    matched: Mutex<Vec<u64>>,
    /// How reading a trusted source's PROXY header ended (routes with `accept_proxy` only).
    proxy_header: [AtomicU64; crate::proxy_header::Outcome::ALL.len()],
}

/// The path's index in [`DataPath::ALL`].
fn path_index(path: DataPath) -> usize {
    path as usize
}

impl RouteCounters {
    /// Counts a failure.
    pub fn fail(&self, why: Failure) {
        self.failed[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts how a peek ended.
    pub fn peeked(&self, outcome: crate::peek::Outcome) {
        self.peek[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Peeks so far that ended with `outcome`.
    pub fn peeks(&self, outcome: crate::peek::Outcome) -> u64 {
        self.peek[outcome.index()].load(Ordering::Relaxed)
    }

    /// Counts how reading a PROXY header ended.
    pub fn proxy_header(&self, outcome: crate::proxy_header::Outcome) {
        self.proxy_header[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// PROXY headers so far that ended with `outcome`.
    pub fn proxy_headers(&self, outcome: crate::proxy_header::Outcome) -> u64 {
        self.proxy_header[outcome.index()].load(Ordering::Relaxed)
    }

    /// Counts a connection match `index` took.
    pub fn matched(&self, index: usize) {
        let mut counts = self.matched.lock().unwrap_or_else(|e| e.into_inner());
        if counts.len() <= index {
            counts.resize(index + 1, 0);
        }
        counts[index] += 1;
    }

    /// Connections each match took so far, by index.
    pub fn matches(&self) -> Vec<u64> {
        self.matched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Failures so far for `why`.
    pub fn failed(&self, why: Failure) -> u64 {
        self.failed[why as usize].load(Ordering::Relaxed)
    }

    /// Counts a closed connection's bytes and data path.
    pub fn closed(&self, path: DataPath, up: u64, down: u64) {
        self.bytes_up.fetch_add(up, Ordering::Relaxed);
        self.bytes_down.fetch_add(down, Ordering::Relaxed);
        self.by_path[path_index(path)].fetch_add(1, Ordering::Relaxed);
    }

    /// Closed connections carried by `path`.
    pub fn closed_on(&self, path: DataPath) -> u64 {
        self.by_path[path_index(path)].load(Ordering::Relaxed)
    }

    /// Records the data path new connections use.
    pub fn set_path(&self, path: DataPath) {
        self.path
            .store(path_index(path) as u64 + 1, Ordering::Relaxed);
    }

    /// The data path new connections use.
    pub fn path(&self) -> Option<DataPath> {
        let index = self.path.load(Ordering::Relaxed).checked_sub(1)?;
        DataPath::ALL.get(index as usize).copied()
    }
}

/// What a live connection looks like right now.
#[derive(Clone, Debug)]
pub struct Sample {
    pub route: String,
    /// The client: the PROXY header's source when a trusted front proxy sent one.
    pub client: SocketAddr,
    /// The front proxy the connection came through, when its PROXY header named the client.
    pub via: Option<SocketAddr>,
    /// `None` while the upstream is being dialed.
    pub upstream: Option<SocketAddr>,
    pub path: Option<DataPath>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub age: Duration,
    pub idle: Duration,
    /// The match routing chose and the name it saw (`rule=match[0] peek=matched
    /// sni=blog.example.com`); `None` on routes without matches.
    pub routing: Option<String>,
}

/// Set once the upstream is connected.
struct Established {
    upstream: SocketAddr,
    path: DataPath,
    /// Both sockets' descriptor numbers. Not duplicates: a duplicate per socket doubled the
    /// descriptors of every connection and halved how many fit under the open-file limit
    /// (4,994 instead of 9,000 idle connections at 20,000). The data path may close its
    /// sockets just before this entry goes, and the numbers may then name someone else's
    /// socket: `sample` reads them only while their peers are still the connection's (the
    /// client's address and port, the upstream's). Checked when sampled rather than by
    /// recording each socket's `SO_COOKIE` at set-up: two system calls fewer per connection.
    client_fd: RawFd,
    upstream_fd: RawFd,
    /// Whether the verdict's `STATS` may count the sockets' bytes (the sockmap path).
    sockmap: bool,
}

/// A descriptor number to read socket options through; never closed or owned.
struct Number(RawFd);

impl AsRawFd for Number {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// One live connection.
pub struct Conn {
    route: String,
    client: SocketAddr,
    /// The client a trusted front proxy's PROXY header named (`client` is then the front).
    proxied: OnceLock<SocketAddr>,
    started: Instant,
    established: OnceLock<Established>,
    routing: OnceLock<String>,
}

impl Conn {
    /// Records that `client` (from a PROXY header) is the real client of this connection from
    /// a front proxy.
    pub fn proxied(&self, client: SocketAddr) {
        let _ = self.proxied.set(client);
    }

    /// Records what routing chose for the connection.
    pub fn routed(&self, description: String) {
        let _ = self.routing.set(description);
    }

    /// Records the connected upstream and the data path that will carry the connection.
    pub fn established(
        &self,
        client: &impl AsRawFd,
        upstream: &impl AsRawFd,
        upstream_addr: SocketAddr,
        path: DataPath,
    ) {
        let _ = self.established.set(Established {
            upstream: upstream_addr,
            path,
            client_fd: client.as_raw_fd(),
            upstream_fd: upstream.as_raw_fd(),
            sockmap: path == DataPath::Sockmap,
        });
    }

    /// Bytes each way and idle time, from the kernel (see the module documentation).
    pub fn sample(&self, sockmap: Option<&Sockmap>) -> Sample {
        let age = self.started.elapsed();
        let mut sample = Sample {
            route: self.route.clone(),
            client: self.proxied.get().copied().unwrap_or(self.client),
            // An IPv4 front of a `[::]` listener shown as IPv4, as `accept_proxy` matched it.
            via: self
                .proxied
                .get()
                .map(|_| SocketAddr::new(self.client.ip().to_canonical(), self.client.port())),
            upstream: None,
            path: None,
            bytes_up: 0,
            bytes_down: 0,
            age,
            idle: age,
            routing: self.routing.get().cloned(),
        };
        let Some(e) = self.established.get() else {
            return sample;
        };
        sample.upstream = Some(e.upstream);
        sample.path = Some(e.path);
        let (client, upstream) = (Number(e.client_fd), Number(e.upstream_fd));
        let ours = |n: &Number, peer: SocketAddr| {
            sockopt::peer_of(n).is_some_and(|p| (p.ip(), p.port()) == (peer.ip(), peer.port()))
        };
        let live = ours(&client, self.client) && ours(&upstream, e.upstream);
        if !live {
            return sample;
        }
        if let (Ok(c), Ok(u)) = (sockopt::tcp_info(&client), sockopt::tcp_info(&upstream)) {
            sample.bytes_up = c.bytes_received;
            sample.bytes_down = u.bytes_received;
            let recv = c.last_data_recv.min(u.last_data_recv);
            sample.idle = sample.idle.min(Duration::from_millis(recv.into()));
        }
        // The cookies only on the sockmap path (read here, not at set-up: see `Established`).
        let Some(sockmap) = sockmap.filter(|_| e.sockmap) else {
            return sample;
        };
        if let (Ok(c), Ok(u)) = (sockopt::cookie(&client), sockopt::cookie(&upstream)) {
            let (c, u): (SockStats, SockStats) = (sockmap.stats(c), sockmap.stats(u));
            let last = c.last_ns.max(u.last_ns);
            if last != 0 {
                sample.bytes_up = c.bytes + c.passed;
                sample.bytes_down = u.bytes + u.passed;
                let since = Duration::from_nanos(monotonic_ns().saturating_sub(last));
                sample.idle = sample.idle.min(since);
            }
        }
        sample
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Every live connection and every route's counters.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    routes: Mutex<BTreeMap<String, Arc<RouteCounters>>>,
    /// The verdict program's maps, for sockmap connections' byte counts.
    sockmap: Option<Arc<Sockmap>>,
    /// Every upstream server, kept across reloads (see [`ServerTable`]).
    servers: Arc<ServerTable>,
    /// The upstream sets of the routes running now.
    upstreams: Mutex<Vec<Arc<Upstreams>>>,
    /// The routes' source rules and their refusal counters.
    filters: Option<Arc<Filters>>,
}

/// A live connection's place in the registry; leaving it removes the entry.
pub struct Entry<'a> {
    registry: &'a Registry,
    id: u64,
    pub conn: Arc<Conn>,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        self.registry.lock_conns().remove(&self.id);
    }
}

impl Registry {
    /// An empty registry that reads sockmap connections' counters from `sockmap`.
    pub fn new(sockmap: Option<Arc<Sockmap>>) -> Registry {
        Registry {
            sockmap,
            ..Registry::default()
        }
    }

    /// The same registry, reading refusals (status, metrics) from `filters`.
    pub fn with_filters(mut self, filters: Arc<Filters>) -> Registry {
        self.filters = Some(filters);
        self
    }

    /// The routes' source rules and refusal counters, if the daemon has them.
    pub fn filters(&self) -> Option<&Filters> {
        self.filters.as_deref()
    }

    /// The loaded verdict program, if any.
    pub fn sockmap(&self) -> Option<&Sockmap> {
        self.sockmap.as_deref()
    }

    /// The table a route's new upstream set takes its servers from.
    pub fn servers(&self) -> Arc<ServerTable> {
        self.servers.clone()
    }

    /// Records the upstream sets of the routes running now (at start and after a reload).
    pub fn set_upstreams(&self, sets: Vec<Arc<Upstreams>>) {
        *self.upstreams.lock().unwrap_or_else(|e| e.into_inner()) = sets;
    }

    /// Status of every server of the routes running now.
    pub fn upstream_status(&self) -> Vec<ServerStatus> {
        let sets = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        sets.iter().flat_map(|s| s.status()).collect()
    }

    fn lock_conns(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counters of route `name`, created on first use and kept for the daemon's life.
    pub fn route(&self, name: &str) -> Arc<RouteCounters> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.entry(name.to_owned()).or_default().clone()
    }

    /// Every route's counters, by name.
    pub fn routes(&self) -> Vec<(String, Arc<RouteCounters>)> {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.iter().map(|(n, c)| (n.clone(), c.clone())).collect()
    }

    /// Registers a connection just accepted.
    pub fn add(&self, route: &str, client: SocketAddr) -> Entry<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            route: route.to_owned(),
            client,
            proxied: OnceLock::new(),
            started: Instant::now(),
            established: OnceLock::new(),
            routing: OnceLock::new(),
        });
        self.lock_conns().insert(id, conn.clone());
        Entry {
            registry: self,
            id,
            conn,
        }
    }

    /// Every live connection, oldest first. The kernel is asked outside the registry's lock.
    pub fn samples(&self) -> Vec<Sample> {
        let conns: Vec<Arc<Conn>> = self.lock_conns().values().cloned().collect();
        conns.iter().map(|c| c.sample(self.sockmap())).collect()
    }
}

#[cfg(test)]
mod tests;
