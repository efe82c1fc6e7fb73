//! The daemon's view of the source rules: the XDP front (when `xdp` lists interfaces), one
//! accept guard per route, and the counters that status and metrics show per route and
//! reason. Reloads replace rules in place; counters of a route that stays keep counting.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{
    config::XdpModeChoice,
    front::{AttachMode, XdpError, XdpFront},
    guard::{AcceptGuard, LogLimiter},
    rules::{Reason, RouteRules, SourceRules},
};

/// How often a route's refusals are logged at most.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Refusals of one route and reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    /// SYNs the XDP program dropped.
    pub xdp: u64,
    /// Connections closed at accept.
    pub accept: u64,
}

struct RouteState {
    guard: Arc<AcceptGuard>,
    /// Refusals at accept by guards this route had before the last reload.
    accept_before: [u64; 2],
    /// XDP drops seen by the last report, and those already logged.
    xdp_seen: [u64; 2],
    xdp_logged: [u64; 2],
    accept_log: LogLimiter,
    xdp_log: LogLimiter,
}

/// Every route's rules and counters, and the XDP front if one is attached.
pub struct Filters {
    front: Mutex<Option<XdpFront>>,
    routes: Mutex<BTreeMap<String, RouteState>>,
}

impl Filters {
    /// Rules for `routes`; with `interfaces`, also the XDP front, loaded from `object` and
    /// attached to each. Fails (and attaches nothing it keeps) on an interface it cannot use.
    pub fn start(
        object: &[u8],
        interfaces: &[String],
        mode: XdpModeChoice,
        routes: &[RouteRules],
    ) -> Result<Filters, XdpError> {
        let filters = Filters {
            front: Mutex::new(None),
            routes: Mutex::new(BTreeMap::new()),
        };
        filters.apply(object, interfaces, mode, routes)?;
        Ok(filters)
    }

    /// Makes the rules, guards and interfaces those of the new configuration. The XDP maps are
    /// updated in place; on an error the front keeps what it had (the caller keeps the old
    /// configuration running).
    /// A changed `mode` detaches and re-attaches every interface: a moment without the front
    /// on them, while the accept check keeps enforcing the rules.
    pub fn apply(
        &self,
        object: &[u8],
        interfaces: &[String],
        mode: XdpModeChoice,
        routes: &[RouteRules],
    ) -> Result<(), XdpError> {
        let generic = mode == XdpModeChoice::Generic;
        {
            let mut front = self.front.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(f) = front.as_mut() {
                if f.generic_only() != generic {
                    f.set_interfaces(&[])?;
                    f.set_generic_only(generic);
                }
                f.set_interfaces(interfaces)?;
                f.set_routes(routes)?;
            } else if !interfaces.is_empty() {
                // Kept only once attached everywhere: a failure drops it, which detaches.
                let mut f = XdpFront::load(object)?;
                f.set_generic_only(generic);
                f.set_routes(routes)?;
                f.set_interfaces(interfaces)?;
                *front = Some(f);
            }
            if interfaces.is_empty() {
                // Dropping the front detaches it from every interface.
                *front = None;
            }
        }
        self.set_guards(routes);
        Ok(())
    }

    fn set_guards(&self, routes: &[RouteRules]) {
        let mut states = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        states.retain(|name, _| routes.iter().any(|r| &r.name == name));
        for route in routes {
            match states.get_mut(&route.name) {
                Some(state) if state.guard.rules() == &route.rules => {}
                Some(state) => {
                    for reason in Reason::ALL {
                        state.accept_before[reason.index() as usize] += state.guard.refused(reason);
                    }
                    state.guard = Arc::new(AcceptGuard::new(route.rules.clone()));
                }
                None => {
                    let state = RouteState {
                        guard: Arc::new(AcceptGuard::new(route.rules.clone())),
                        accept_before: [0; 2],
                        xdp_seen: [0; 2],
                        xdp_logged: [0; 2],
                        accept_log: LogLimiter::new(LOG_INTERVAL),
                        xdp_log: LogLimiter::new(LOG_INTERVAL),
                    };
                    states.insert(route.name.clone(), state);
                }
            }
        }
    }

    /// Detaches the XDP front from every interface (at exit; the kernel would do it anyway
    /// when the links' descriptors close, but the log should say so).
    pub fn detach(&self) {
        let mut front = self.front.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut f) = front.take() {
            if let Err(e) = f.set_interfaces(&[]) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Every route with rules or refusals: (name, rules, refusals by reason in
    /// [`Reason::ALL`] order), for status and metrics.
    pub fn summary(&self) -> Vec<(String, SourceRules, [Refusals; 2])> {
        let rules: Vec<(String, SourceRules)> = {
            let states = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            states
                .iter()
                .map(|(n, s)| (n.clone(), s.guard.rules().clone()))
                .collect()
        };
        rules
            .into_iter()
            .map(|(name, rules)| {
                let counts = Reason::ALL.map(|r| self.refusals(&name, r));
                (name, rules, counts)
            })
            .collect()
    }

    /// The accept-time check of route `name` on `peer`; a refusal is counted and logged at
    /// most once per [`LOG_INTERVAL`] for the route.
    pub fn check(&self, name: &str, peer: IpAddr) -> Result<(), Reason> {
        let guard = {
            let states = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            match states.get(name) {
                Some(s) if !s.guard.rules().is_empty() => s.guard.clone(),
                _ => return Ok(()),
            }
        };
        let verdict = guard.check(peer);
        if let Err(reason) = verdict {
            let states = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = states
                .get(name)
                .and_then(|s| s.accept_log.add(1, Instant::now()))
            {
                tracing::warn!(
                    "route {name}: {n} connection(s) refused at accept since the last report \
                     (latest: {peer}, {})",
                    reason.label()
                );
            }
        }
        verdict
    }

    /// The rules of route `name` (for `spliced check` and status).
    pub fn rules(&self, name: &str) -> Option<SourceRules> {
        let states = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        states.get(name).map(|s| s.guard.rules().clone())
    }

    /// The interfaces the front is attached to, and how.
    pub fn interfaces(&self) -> Vec<(String, AttachMode)> {
        let front = self.front.lock().unwrap_or_else(|e| e.into_inner());
        front.as_ref().map_or_else(Vec::new, |f| {
            f.interfaces().map(|(n, m)| (n.to_owned(), m)).collect()
        })
    }

    /// Refusals of route `name` for `reason`, in XDP and at accept.
    pub fn refusals(&self, name: &str, reason: Reason) -> Refusals {
        let xdp = {
            let front = self.front.lock().unwrap_or_else(|e| e.into_inner());
            front
                .as_ref()
                .and_then(|f| f.drops(name, reason).ok())
                .unwrap_or(0)
        };
        let states = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let accept = states.get(name).map_or(0, |s| {
            s.accept_before[reason.index() as usize] + s.guard.refused(reason)
        });
        Refusals { xdp, accept }
    }

    /// Logs each route's new XDP drops, at most once per [`LOG_INTERVAL`] per route (the
    /// daemon calls this every few seconds).
    pub fn report(&self) {
        let names: Vec<String> = {
            let states = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            states.keys().cloned().collect()
        };
        for name in names {
            let now: Vec<u64> = Reason::ALL
                .iter()
                .map(|r| self.refusals(&name, *r).xdp)
                .collect();
            let mut states = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            let Some(state) = states.get_mut(&name) else {
                continue;
            };
            let new: u64 = now
                .iter()
                .zip(&state.xdp_seen)
                .map(|(n, l)| n.saturating_sub(*l))
                .sum();
            state.xdp_seen = [now[0], now[1]];
            if state.xdp_log.add(new, Instant::now()).is_some() {
                tracing::warn!(
                    "route {name}: the XDP front dropped {} SYN(s) by acl and {} by syn_rate \
                     since the last report",
                    now[0].saturating_sub(state.xdp_logged[0]),
                    now[1].saturating_sub(state.xdp_logged[1]),
                );
                state.xdp_logged = [now[0], now[1]];
            }
        }
    }
}
