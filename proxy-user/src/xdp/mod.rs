//! The XDP front (issue 15): per-route source ACLs (`allow`, `deny`) and a per-source SYN
//! token bucket (`syn_rate`), enforced by an XDP program on the interfaces in `xdp` before the
//! kernel's TCP stack sees a packet, and by [`AcceptGuard`] at accept for every connection.
//!
//! - [`rules`]: prefixes, a route's rules, and their compilation into map entries (pure).
//! - [`front`]: loading, attaching (native, else generic), map updates in place, counters.
//! - [`guard`]: the accept-time check and the once-per-interval log limiter.
//! - [`filters`]: the daemon's view: front, guards and counters per route, across reloads.
//! - [`config`]: the values of `xdp`, `allow`, `deny`, `syn_rate`.
pub mod config;
mod filters;
mod front;
mod guard;
mod netlink;
mod rules;
#[cfg(test)]
mod tests;

pub use filters::{Filters, Refusals, LOG_INTERVAL};
pub use front::{AttachMode, ProgramKind, XdpError, XdpFront};
pub use guard::{AcceptGuard, LogLimiter};
pub use rules::{
    route_key, MapOp, MapPlan, Prefix, PrefixError, Reason, RouteIds, RouteRules, SourceRules,
    TooManyRoutes,
};
