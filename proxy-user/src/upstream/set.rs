//! A live upstream set: the spec, its servers as last resolved, and the round-robin state.
use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use tokio::task::JoinSet;

use super::{
    balance::{self, key_of, Candidate, RoundRobin},
    Server, ServerSpec, ServerStatus, ServerTable, UpstreamSpec,
};
use crate::addr::{AddrError, Endpoint, Host};

/// One server of the set as resolved now: the server, the address to dial, and its entry's
/// weight and backup flag.
#[derive(Clone, Debug)]
pub struct Target {
    pub server: Arc<Server>,
    pub addr: SocketAddr,
    pub weight: u32,
    pub backup: bool,
    key: u64,
}

/// The upstream set of one route or one routing match.
#[derive(Debug)]
pub struct Upstreams {
    scope: String,
    spec: UpstreamSpec,
    table: Arc<ServerTable>,
    /// Each entry's servers as last resolved; kept when a later resolution fails (a DNS outage
    /// does not empty the set).
    resolved: Mutex<Vec<Vec<Target>>>,
    rr: Mutex<RoundRobin>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Upstreams {
    /// The set for `spec` in `scope` (the route's name, or `ROUTE/match[I]`). Its servers are the
    /// table's: those a set of the same scope holds now (before a reload swaps it out) keep
    /// their state. IP literals are resolved at once, so status lists them from the start.
    pub fn new(scope: impl Into<String>, spec: UpstreamSpec, table: Arc<ServerTable>) -> Self {
        let scope = scope.into();
        let resolved = spec
            .servers
            .iter()
            .map(|entry| match resolve_now(&entry.address) {
                Some(Ok(addrs)) => targets(&table, &scope, entry, &addrs),
                // A missing zone interface: found again at the first dial or check.
                Some(Err(_)) => Vec::new(),
                None => table
                    .named(&scope, &format!("{}@", entry.address))
                    .into_iter()
                    .filter_map(|s| {
                        let addr = s.name().rsplit_once('@')?.1.parse().ok()?;
                        Some(target(s, addr, entry))
                    })
                    .collect(),
            })
            .collect();
        Upstreams {
            scope,
            spec,
            table,
            resolved: Mutex::new(resolved),
            rr: Mutex::new(RoundRobin::default()),
        }
    }

    pub fn scope(&self) -> &str {
        &self.scope
    }

    pub fn spec(&self) -> &UpstreamSpec {
        &self.spec
    }

    /// Resolves every entry now (all at once: a slow DNS name does not hold up the others) and
    /// returns the servers. An entry that fails keeps its last addresses; the error is returned
    /// only when no entry has any.
    pub async fn resolve(&self) -> Result<Vec<Target>, AddrError> {
        let mut lookups = JoinSet::new();
        let mut fresh: Vec<Option<Result<Vec<SocketAddr>, AddrError>>> = Vec::new();
        for (i, entry) in self.spec.servers.iter().enumerate() {
            match resolve_now(&entry.address) {
                Some(r) => fresh.push(Some(r)),
                None => {
                    fresh.push(None);
                    let address = entry.address.clone();
                    lookups.spawn(async move { (i, address.resolve().await) });
                }
            }
        }
        while let Some(done) = lookups.join_next().await {
            if let Ok((i, r)) = done {
                fresh[i] = Some(r);
            }
        }
        let mut resolved = lock(&self.resolved);
        let mut first_error = None;
        for ((entry, slot), r) in self.spec.servers.iter().zip(resolved.iter_mut()).zip(fresh) {
            match r {
                // Unchanged (the usual case): the same servers, nothing to rebuild. This runs at
                // every dial; rebuilding named each server again and looked it up in the table.
                Some(Ok(addrs)) if slot.iter().map(|t| t.addr).eq(addrs.iter().copied()) => {}
                Some(Ok(addrs)) => *slot = targets(&self.table, &self.scope, entry, &addrs),
                Some(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                None => {}
            }
        }
        let all: Vec<Target> = resolved.iter().flatten().cloned().collect();
        match first_error {
            Some(e) if all.is_empty() => Err(e),
            _ => Ok(all),
        }
    }

    /// The servers as last resolved, without resolving.
    pub fn targets(&self) -> Vec<Target> {
        lock(&self.resolved).iter().flatten().cloned().collect()
    }

    /// Status of every server as last resolved.
    pub fn status(&self) -> Vec<ServerStatus> {
        self.targets()
            .iter()
            .map(|t| t.server.status(t.backup, t.weight))
            .collect()
    }

    /// `targets` in the order a connection from `client` tries them (see [`balance::order`]).
    pub fn plan(&self, targets: &[Target], client: IpAddr) -> Vec<Target> {
        let candidates: Vec<Candidate> = targets
            .iter()
            .map(|t| Candidate {
                key: t.key,
                weight: t.weight,
                active: t.server.active(),
                backup: t.backup,
                up: t.server.is_up(),
            })
            .collect();
        let order = balance::order(self.spec.balance, &candidates, &mut lock(&self.rr), client);
        order.into_iter().map(|i| targets[i].clone()).collect()
    }
}

/// The servers of `entry` for these addresses. An IP literal is one server named as written
/// (its zone's index may change, its name does not); a host name gives `NAME:PORT@ADDRESS` per
/// address.
fn targets(
    table: &ServerTable,
    scope: &str,
    entry: &ServerSpec,
    addrs: &[SocketAddr],
) -> Vec<Target> {
    let literal = matches!(entry.address.host, Host::Ip(_));
    addrs
        .iter()
        .map(|&addr| {
            let name = if literal {
                entry.address.to_string()
            } else {
                format!("{}@{addr}", entry.address)
            };
            target(table.server(scope, &name), addr, entry)
        })
        .collect()
}

fn target(server: Arc<Server>, addr: SocketAddr, entry: &ServerSpec) -> Target {
    Target {
        key: key_of(server.name()),
        server,
        addr,
        weight: entry.weight,
        backup: entry.backup,
    }
}

/// Resolves an IP literal (its zone by `if_nametoindex`) without waiting; `None` for a host
/// name, which needs a DNS lookup.
fn resolve_now(address: &Endpoint) -> Option<Result<Vec<SocketAddr>, AddrError>> {
    if !matches!(address.host, Host::Ip(_)) {
        return None;
    }
    // Resolving a literal never waits, so one poll finishes it.
    match pin!(address.resolve()).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => Some(r),
        Poll::Pending => None,
    }
}
