//! Several upstream servers behind one route (or one routing match): balancing, weights, backup
//! servers, passive failover on dial and active health checks.
//!
//! - [`UpstreamSpec`] is what the configuration says: the entries (`upstream` as a string, a list
//!   of strings or `{address, weight, backup}` tables), `balance` and `health_check`.
//! - [`Upstreams`] is one live set built from a spec. Its entries are resolved at every dial and
//!   every check (zone names and host names can change while the daemon runs); each resolved
//!   address is a [`Server`] with its own health and counters. A host name with several addresses
//!   (Docker's round-robin DNS, a scaled compose service) gives one server per address.
//! - [`dial`] is the one entry point that connects a client to a set: it orders the servers by the
//!   set's balance, skips the ones that are down, and goes on to the next on a refused,
//!   unreachable or timed-out dial, all within the route's `connect_timeout`. A failed dial marks
//!   that server down at once (the passive check).
//! - [`Checker`] runs the active checks of a set (TCP connect, `rise`/`fall`); without
//!   `health_check` it only probes servers a dial found down, so they come back without a reload.
//! - [`ServerTable`] keeps each server's state across reloads: a set built for the new
//!   configuration takes over the servers of the old one that have the same scope and address.
mod balance;
mod dial;
mod health;
pub mod parse;
mod ports;
mod report;
mod server;
mod set;
#[cfg(test)]
mod tests;

use std::{fmt, time::Duration};

pub use balance::{order, Candidate, RoundRobin};
pub use dial::{dial, Attempt, ConnectError, DialError, DialOptions, Dialed};
pub use health::{CheckOptions, Checker, PROXY_V2_LOCAL, RECOVERY_INTERVAL};
pub use report::{render_metrics, render_status};
pub use server::{
    Health, Lease, Observation, Server, ServerStatus, ServerTable, State, Transition,
};
pub use set::{Target, Upstreams};

use crate::addr::Endpoint;

/// How a set spreads new connections over its servers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Balance {
    /// Each server in turn, in proportion to its weight (smooth weighted round robin).
    #[default]
    RoundRobin,
    /// The server with the fewest live connections for its weight.
    LeastConn,
    /// A consistent hash of the client's address: the same client goes to the same server while
    /// the set is unchanged, and removing one of N servers moves only its own clients (about
    /// 1/N of them).
    Source,
}

impl Balance {
    /// Every balance, in the order the documentation lists them.
    pub const ALL: [Balance; 3] = [Balance::RoundRobin, Balance::LeastConn, Balance::Source];

    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "roundrobin",
            Balance::LeastConn => "leastconn",
            Balance::Source => "source",
        }
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `health_check = { interval, timeout, rise, fall }`: active TCP checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// Time between the starts of two checks of a server.
    pub interval: Duration,
    /// How long one check may take (connect, and the PROXY header when one is sent).
    pub timeout: Duration,
    /// Consecutive successes that bring a down server up.
    pub rise: u32,
    /// Consecutive failures that take an up server down.
    pub fall: u32,
}

impl Default for HealthCheck {
    /// HAProxy's defaults: every 2 s, up after 2 successes, down after 3 failures; a check may
    /// take 1 s.
    fn default() -> Self {
        HealthCheck {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

/// The largest `weight`: HAProxy's bound; more only makes the round-robin cycle longer.
pub const MAX_WEIGHT: u32 = 256;
/// The largest `rise` or `fall`.
pub const MAX_RISE_FALL: u32 = 100;

/// One entry of `upstream`: an address (an IP literal or a host name) with its weight and
/// whether it is a backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSpec {
    pub address: Endpoint,
    /// Share of new connections relative to the other servers (1 to [`MAX_WEIGHT`]).
    pub weight: u32,
    /// Used only while no primary (non-backup) server is up.
    pub backup: bool,
}

impl ServerSpec {
    /// A primary server of weight 1.
    pub fn new(address: Endpoint) -> Self {
        ServerSpec {
            address,
            weight: 1,
            backup: false,
        }
    }
}

impl fmt::Display for ServerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.address)?;
        if self.weight != 1 {
            write!(f, " weight {}", self.weight)?;
        }
        if self.backup {
            f.write_str(" backup")?;
        }
        Ok(())
    }
}

/// What `upstream`, `balance` and `health_check` of a route or a match say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// At least one entry.
    pub servers: Vec<ServerSpec>,
    pub balance: Balance,
    /// `None`: no active checks; only dials (and probes of servers a dial found down) decide.
    pub health_check: Option<HealthCheck>,
}

impl UpstreamSpec {
    /// One server, round robin, no active checks: what `upstream = "ADDR"` means.
    pub fn single(address: Endpoint) -> Self {
        UpstreamSpec {
            servers: vec![ServerSpec::new(address)],
            balance: Balance::RoundRobin,
            health_check: None,
        }
    }
}

impl fmt::Display for UpstreamSpec {
    /// `ADDR`, or `ADDR, ADDR weight 3, ADDR backup (leastconn)` for several.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.servers.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{s}")?;
        }
        if self.servers.len() > 1 || self.balance != Balance::RoundRobin {
            write!(f, " ({})", self.balance)?;
        }
        Ok(())
    }
}
