//! SIGHUP: a pure plan of what changes between two configurations, and the step that applies it.
use tracing::{info, warn};

use std::net::SocketAddr;

use super::{listen, Daemon, StartError};
use crate::{
    config::{Config, Route},
    XDP_OBJECT,
};

/// What a reload changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: usize,
    pub removed: usize,
    pub changed: usize,
}

/// What happens to each route of a reload.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Plan {
    /// For each new route: the old route (index) whose listener it keeps, or `None` for a
    /// new listener.
    pub(super) reuse: Vec<Option<usize>>,
    /// Old routes no new route keeps: their listeners stop.
    pub(super) removed: Vec<usize>,
}

/// Matches new routes to old listeners: a route keeps a listener whose listen address is the
/// same, preferring the old route of the same name. Port 0 picks a fresh port at each bind, so
/// a port-0 route keeps its listener only under the same name.
pub(super) fn plan(old: &[Route], new: &[Route]) -> Plan {
    let mut taken = vec![false; old.len()];
    let mut reuse = Vec::with_capacity(new.len());
    for route in new {
        let same_listen = |i: usize| {
            let o = &old[i];
            o.listen == route.listen && (route.listen.port != 0 || o.name == route.name)
        };
        let free = |i: &usize| !taken[*i] && same_listen(*i);
        let found = (0..old.len())
            .filter(free)
            .find(|&i| old[i].name == route.name)
            .or_else(|| (0..old.len()).find(free));
        if let Some(i) = found {
            taken[i] = true;
        }
        reuse.push(found);
    }
    let removed = (0..old.len()).filter(|&i| !taken[i]).collect();
    Plan { reuse, removed }
}

/// Top-level keys that only take effect when spliced restarts.
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    [
        ("send_buffer", old.send_buffer != new.send_buffer),
        (
            "max_buffered_total",
            old.max_buffered_total != new.max_buffered_total,
        ),
        ("control_socket", old.control_socket != new.control_socket),
        ("user", old.user != new.user),
        ("metrics", old.metrics != new.metrics),
        ("workers", old.workers != new.workers),
        ("pin_lanes", old.pin_lanes != new.pin_lanes),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

impl Daemon {
    /// Applies a new configuration (SIGHUP): new routes start, removed routes stop accepting,
    /// changed routes apply to new connections; established connections are untouched. A route
    /// keeps its listener when its listen address is unchanged (matched by name, or by address
    /// when the name changed). Nothing changes unless every new listener could be bound; then
    /// the errors are returned and the old configuration stays.
    ///
    /// Top-level keys that only take effect at start (`send_buffer`, `max_buffered_total`,
    /// `control_socket`, `metrics`, `user`, `workers`, `pin_lanes`) are reported as warnings when changed;
    /// `max_connections` and `grace_period` apply at once.
    pub async fn reload(&mut self, config: Config) -> Result<ReloadSummary, Vec<StartError>> {
        let plan = plan(&self.config.routes, &config.routes);
        let mut errors: Vec<StartError> = config
            .routes
            .iter()
            .filter_map(|r| self.plan_for(r).err())
            .collect();
        let mut fresh = Vec::new();
        for (route, found) in config.routes.iter().zip(&plan.reuse) {
            fresh.push(match found {
                Some(_) => None,
                None => match listen::listener(route, &self.inherited).await {
                    Ok(l) => Some(l),
                    Err(e) => {
                        errors.push(e);
                        None
                    }
                },
            });
        }
        if errors.is_empty() {
            // The rules, before any listener changes: on a failure nothing else does.
            let addrs = self.bound_addrs(&plan, &fresh);
            let rules = super::route_rules(&config.routes, &addrs);
            if let Err(e) =
                self.shared
                    .filters
                    .apply(XDP_OBJECT, &config.xdp, config.xdp_mode, &rules)
            {
                errors.push(e.into());
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        for key in restart_only(&self.config, &config) {
            warn!("reload: {key} changed; it takes effect only when spliced restarts");
        }
        self.shared.max_connections.store(
            config.max_connections as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let summary = self.apply(&config, plan, fresh).await;
        self.config = config;
        Ok(summary)
    }

    /// Each new route's bound address: its reused listener's, or its fresh one's.
    fn bound_addrs(&self, plan: &Plan, fresh: &[Option<listen::Bound>]) -> Vec<SocketAddr> {
        plan.reuse
            .iter()
            .zip(fresh)
            .filter_map(|(found, bound)| match (found, bound) {
                (Some(i), _) => self.slots.get(*i).map(|s| s.local_addr),
                (None, Some(bound)) => Some(bound.addr),
                (None, None) => None,
            })
            .collect()
    }

    /// Swaps, opens and closes listeners as `plan` says; `fresh` holds the new routes' bound
    /// listeners.
    async fn apply(
        &mut self,
        config: &Config,
        plan: Plan,
        fresh: Vec<Option<listen::Bound>>,
    ) -> ReloadSummary {
        let mut summary = ReloadSummary::default();
        let mut old: Vec<_> = self.slots.drain(..).map(Some).collect();
        let old_routes = &self.config.routes;
        let mut slots = Vec::new();
        for ((route, found), listener) in config.routes.iter().zip(plan.reuse).zip(fresh) {
            let slot = match (found.and_then(|i| old[i].take().map(|s| (i, s))), listener) {
                (Some((i, mut slot)), _) => {
                    if old_routes[i] != *route {
                        // The new upstream set takes over the servers it shares with the old
                        // one (and their health) before the old checker stops.
                        let state = self.state(route.clone());
                        slot.checkers = state.checkers();
                        info!(
                            "route {}: changed; new connections go to {} on data path {}",
                            route.name,
                            route.upstream_text(),
                            state.plan.path()
                        );
                        slot.route.send_replace(state);
                        summary.changed += 1;
                    }
                    slot
                }
                (None, Some(listener)) => {
                    summary.added += 1;
                    self.open(route.clone(), listener)
                }
                (None, None) => unreachable!("every new route was bound or reuses a listener"),
            };
            slots.push(slot);
        }
        for i in plan.removed {
            if let Some(slot) = old[i].take() {
                info!(
                    "route {}: removed; stopped listening on {} (live connections carry on)",
                    old_routes[i].name, slot.local_addr
                );
                slot.close().await;
                summary.removed += 1;
            }
        }
        self.slots = slots;
        self.publish_upstreams();
        summary
    }
}

#[cfg(test)]
mod tests;
