//! One upstream server (one resolved address of one entry): its health, its counters, and the
//! table that hands the same server to the set of a reloaded configuration.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    time::{Duration, Instant},
};

use tracing::{info, warn};

/// Whether a server takes new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Up,
    Down,
}

/// A change of state, to be logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    WentUp,
    WentDown,
}

/// The outcome of the last check or dial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub ok: bool,
    /// "connected in 2 ms", "connection refused", "no answer within 1s".
    pub detail: String,
    pub at: Instant,
}

/// The health state machine of a server. A server starts up (it takes connections at once, as
/// HAProxy's do); its first check result counts alone, so a dead server is found by one check.
/// After that, `fall` consecutive failed checks take it down and `rise` consecutive successes
/// bring it up. A failed dial takes it down at once (the passive check).
#[derive(Clone, Debug)]
pub struct Health {
    state: State,
    /// Consecutive results against the current state: successes while down, failures while up.
    streak: u32,
    checked: bool,
    since: Instant,
    last_check: Option<Observation>,
}

impl Health {
    /// A server that has not been checked yet: up.
    pub fn new(now: Instant) -> Self {
        Health {
            state: State::Up,
            streak: 0,
            checked: false,
            since: now,
            last_check: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Records an active check's result.
    pub fn check(&mut self, seen: Observation, rise: u32, fall: u32) -> Option<Transition> {
        let (ok, now, first) = (seen.ok, seen.at, !self.checked);
        self.checked = true;
        self.last_check = Some(seen);
        let against = match self.state {
            State::Up => !ok,
            State::Down => ok,
        };
        if !against {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = match self.state {
            State::Up if first => 1,
            State::Up => fall.max(1),
            State::Down => rise.max(1),
        };
        (self.streak >= needed).then(|| self.flip(now))
    }

    /// A dial that was refused, unreachable or timed out: down at once.
    pub fn dial_failed(&mut self, now: Instant) -> Option<Transition> {
        (self.state == State::Up).then(|| self.flip(now))
    }

    /// A dial that connected. Brings a down server up only when no active checks run (with
    /// checks, `rise` successful checks decide).
    pub fn dial_succeeded(&mut self, checks: bool, now: Instant) -> Option<Transition> {
        (self.state == State::Down && !checks).then(|| self.flip(now))
    }

    fn flip(&mut self, now: Instant) -> Transition {
        self.streak = 0;
        self.since = now;
        match self.state {
            State::Up => {
                self.state = State::Down;
                Transition::WentDown
            }
            State::Down => {
                self.state = State::Up;
                Transition::WentUp
            }
        }
    }
}

/// What `spliced status` and the metrics show of a server.
#[derive(Clone, Debug)]
pub struct ServerStatus {
    /// The route (or `ROUTE/match[I]`) the server belongs to.
    pub scope: String,
    /// `ADDRESS` as written, or `NAME:PORT@RESOLVED` for a host name's addresses.
    pub name: String,
    pub backup: bool,
    pub weight: u32,
    pub state: State,
    /// How long it has been in that state.
    pub since: Duration,
    /// The last active check (or recovery probe), if any ran.
    pub last_check: Option<Observation>,
    pub active: u64,
    /// Connections it took.
    pub total: u64,
    pub dial_failures: u64,
    pub check_failures: u64,
    /// Dials slowed down (or failed) by a search for a free local port.
    pub port_search_dials: u64,
}

/// One server of a set.
#[derive(Debug)]
pub struct Server {
    scope: String,
    name: String,
    health: Mutex<Health>,
    /// `health.state == Up`, readable without the lock on every dial.
    up: AtomicBool,
    active: AtomicU64,
    total: AtomicU64,
    dial_failures: AtomicU64,
    check_failures: AtomicU64,
    port_search_dials: AtomicU64,
    /// Set once the port search was warned about (once per server).
    port_search_warned: AtomicBool,
}

/// A connection counted on its server while it lives (leastconn, status, metrics). It holds the
/// server, so a server removed by a reload keeps its count until its last connection ends.
#[derive(Debug)]
pub struct Lease(Arc<Server>);

impl Lease {
    pub fn server(&self) -> &Arc<Server> {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Server {
    /// A new server, up and never checked.
    pub fn new(scope: &str, name: &str) -> Self {
        Server {
            scope: scope.to_owned(),
            name: name.to_owned(),
            health: Mutex::new(Health::new(Instant::now())),
            up: AtomicBool::new(true),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            dial_failures: AtomicU64::new(0),
            check_failures: AtomicU64::new(0),
            port_search_dials: AtomicU64::new(0),
            port_search_warned: AtomicBool::new(false),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Live connections.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Acquire)
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a connection established to this server.
    pub fn lease(self: &Arc<Self>) -> Lease {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.total.fetch_add(1, Ordering::Relaxed);
        Lease(self.clone())
    }

    /// Records an active check (or a recovery probe) and logs a change of state.
    pub fn checked(&self, seen: Observation, rise: u32, fall: u32) {
        if !seen.ok {
            self.check_failures.fetch_add(1, Ordering::Relaxed);
        }
        let detail = seen.detail.clone();
        let mut health = self.health();
        let change = health.check(seen, rise, fall);
        self.apply(&health, change, || format!("health check: {detail}"));
    }

    /// Records a failed dial (down at once) and logs a change of state.
    pub fn dial_failed(&self, why: &str) {
        self.dial_failures.fetch_add(1, Ordering::Relaxed);
        let mut health = self.health();
        let change = health.dial_failed(Instant::now());
        self.apply(&health, change, || format!("dial failed: {why}"));
    }

    /// Records a dial that connected.
    pub fn dial_succeeded(&self, checks: bool) {
        if self.is_up() {
            return;
        }
        let mut health = self.health();
        let change = health.dial_succeeded(checks, Instant::now());
        self.apply(&health, change, || "a dial connected".to_owned());
    }

    /// Counts a dial that a full local port range slowed down or failed (see
    /// [`super::ports`]) and warns the first time, with `advice`.
    pub fn port_search(&self, advice: impl FnOnce() -> String) {
        self.port_search_dials.fetch_add(1, Ordering::Relaxed);
        if !self.port_search_warned.load(Ordering::Relaxed)
            && !self.port_search_warned.swap(true, Ordering::Relaxed)
        {
            warn!(route = %self.scope, server = %self.name, "{}", advice());
        }
    }

    fn apply(&self, health: &Health, change: Option<Transition>, why: impl FnOnce() -> String) {
        self.up
            .store(health.state() == State::Up, Ordering::Release);
        let (scope, server) = (&self.scope, &self.name);
        match change {
            Some(Transition::WentDown) => warn!(
                route = %scope, server = %server,
                "upstream server down ({}); new connections skip it", why()
            ),
            Some(Transition::WentUp) => info!(
                route = %scope, server = %server,
                "upstream server up ({}); it takes new connections again", why()
            ),
            None => {}
        }
    }

    /// A snapshot for status and metrics; `backup` and `weight` come from the entry.
    pub fn status(&self, backup: bool, weight: u32) -> ServerStatus {
        let health = self.health().clone();
        ServerStatus {
            scope: self.scope.clone(),
            name: self.name.clone(),
            backup,
            weight,
            state: health.state,
            since: health.since.elapsed(),
            last_check: health.last_check,
            active: self.active(),
            total: self.total.load(Ordering::Relaxed),
            dial_failures: self.dial_failures.load(Ordering::Relaxed),
            check_failures: self.check_failures.load(Ordering::Relaxed),
            port_search_dials: self.port_search_dials.load(Ordering::Relaxed),
        }
    }
}

/// Every server any live set holds, by (scope, name). Weak: a server no set and no connection
/// holds is gone, and a set built later starts it afresh. A reload builds the new sets while the
/// old ones still live, so servers that stay keep their health, counters and live connections.
#[derive(Debug, Default)]
pub struct ServerTable {
    servers: Mutex<HashMap<(String, String), Weak<Server>>>,
}

impl ServerTable {
    /// The server `name` of `scope`: the live one if there is one, or a new one (up).
    pub fn server(&self, scope: &str, name: &str) -> Arc<Server> {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        let key = (scope.to_owned(), name.to_owned());
        if let Some(live) = servers.get(&key).and_then(Weak::upgrade) {
            return live;
        }
        if servers.len() >= 64 {
            servers.retain(|_, w| w.strong_count() > 0);
        }
        let fresh = Arc::new(Server::new(scope, name));
        servers.insert(key, Arc::downgrade(&fresh));
        fresh
    }

    /// The live servers of `scope` whose names start with `prefix` (a host name's addresses,
    /// `NAME:PORT@`), for a new set to start with what the old one last resolved.
    pub fn named(&self, scope: &str, prefix: &str) -> Vec<Arc<Server>> {
        let servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        servers
            .iter()
            .filter(|((s, n), _)| s == scope && n.starts_with(prefix))
            .filter_map(|(_, w)| w.upgrade())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(ok: bool) -> Observation {
        Observation {
            ok,
            detail: String::new(),
            at: Instant::now(),
        }
    }

    #[test]
    fn first_failed_check_takes_a_new_server_down() {
        let mut h = Health::new(Instant::now());
        assert_eq!(h.check(seen(false), 2, 3), Some(Transition::WentDown));
        assert_eq!(h.state(), State::Down);
    }

    #[test]
    fn rise_and_fall_count_consecutive_results() {
        let mut h = Health::new(Instant::now());
        assert_eq!(h.check(seen(true), 2, 3), None);
        // fall = 3: two failures, a success, three failures.
        assert_eq!(h.check(seen(false), 2, 3), None);
        assert_eq!(h.check(seen(false), 2, 3), None);
        assert_eq!(h.check(seen(true), 2, 3), None);
        assert_eq!(h.check(seen(false), 2, 3), None);
        assert_eq!(h.check(seen(false), 2, 3), None);
        assert_eq!(h.check(seen(false), 2, 3), Some(Transition::WentDown));
        // rise = 2: a success, a failure, two successes.
        assert_eq!(h.check(seen(true), 2, 3), None);
        assert_eq!(h.check(seen(false), 2, 3), None);
        assert_eq!(h.check(seen(true), 2, 3), None);
        assert_eq!(h.check(seen(true), 2, 3), Some(Transition::WentUp));
        assert_eq!(h.state(), State::Up);
    }

    #[test]
    fn dials_mark_down_at_once_and_up_only_without_checks() {
        let now = Instant::now();
        let mut h = Health::new(now);
        assert_eq!(h.dial_failed(now), Some(Transition::WentDown));
        assert_eq!(h.dial_failed(now), None);
        assert_eq!(h.dial_succeeded(true, now), None, "checks decide");
        assert_eq!(h.dial_succeeded(false, now), Some(Transition::WentUp));
        assert_eq!(h.dial_succeeded(false, now), None);
    }

    #[test]
    fn table_hands_out_the_live_server() {
        let table = ServerTable::default();
        let a = table.server("web", "10.0.0.1:80");
        a.dial_failed("refused");
        let again = table.server("web", "10.0.0.1:80");
        assert!(Arc::ptr_eq(&a, &again));
        assert!(!again.is_up());
        assert!(!Arc::ptr_eq(&a, &table.server("db", "10.0.0.1:80")));
        drop((a, again));
        assert!(table.server("web", "10.0.0.1:80").is_up(), "a new server");
    }

    #[test]
    fn leases_count_live_connections() {
        let s = Arc::new(Server::new("web", "10.0.0.1:80"));
        let (a, b) = (s.lease(), s.lease());
        assert_eq!(s.active(), 2);
        drop(a);
        let status = s.status(false, 1);
        assert_eq!((status.active, status.total), (1, 2));
        drop(b);
        assert_eq!(s.active(), 0);
    }
}
