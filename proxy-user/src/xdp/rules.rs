//! A route's source rules (`allow`, `deny`, `syn_rate`) and their compilation into the XDP
//! front's map entries. Pure: no maps, no sockets; the same rules also decide at accept
//! (the accept guard) for connections that did not pass through XDP.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use proxy_common::{
    XdpPrefixKey, XdpRoute, XdpRouteKey, XDP_MAX_ROUTES, XDP_PREFIX_BASE, XDP_ROUTE_HAS_ALLOW,
    XDP_ROUTE_HAS_DENY,
};

/// A source prefix as written in `allow` or `deny`: `198.51.100.0/24`, `2001:db8:1::/48`, or a
/// bare address (a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

/// Why a prefix was refused; the message says how to write it instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("{0:?} is not an address or a prefix (write 198.51.100.0/24 or 2001:db8::/32)")]
    Syntax(String),
    #[error("/{len} is longer than an {family} address ({max} bits)")]
    TooLong {
        len: u32,
        family: &'static str,
        max: u8,
    },
    #[error("{text} has bits set below the /{len} prefix: write {fixed}")]
    HostBits {
        text: String,
        len: u8,
        fixed: Prefix,
    },
    #[error("{text} is an IPv4-mapped IPv6 prefix: write it as IPv4 ({fixed})")]
    Mapped { text: String, fixed: Prefix },
}

impl Prefix {
    /// The family's address length in bits.
    fn max(addr: IpAddr) -> u8 {
        if addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    /// Whether `ip` (IPv4-mapped IPv6 counts as IPv4) lies in this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(p), IpAddr::V4(a)) => mask4(a, self.len) == p,
            (IpAddr::V6(p), IpAddr::V6(a)) => mask6(a, self.len) == p,
            _ => false,
        }
    }

    /// The LPM trie key of this prefix for route `id`: (prefix length, data).
    pub fn trie_key(&self, id: u32) -> (u32, XdpPrefixKey) {
        let mut data = [0u8; 24];
        data[..4].copy_from_slice(&id.to_be_bytes());
        match self.addr {
            IpAddr::V4(a) => {
                data[4] = 4;
                data[8..12].copy_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                data[4] = 6;
                data[8..].copy_from_slice(&a.octets());
            }
        }
        (XDP_PREFIX_BASE + u32::from(self.len), data)
    }
}

fn mask4(a: Ipv4Addr, len: u8) -> Ipv4Addr {
    let bits = u32::from(a);
    Ipv4Addr::from(if len == 0 {
        0
    } else {
        bits & (u32::MAX << (32 - len))
    })
}

fn mask6(a: Ipv6Addr, len: u8) -> Ipv6Addr {
    let bits = u128::from(a);
    Ipv6Addr::from(if len == 0 {
        0
    } else {
        bits & (u128::MAX << (128 - len))
    })
}

impl FromStr for Prefix {
    type Err = PrefixError;

    fn from_str(text: &str) -> Result<Prefix, PrefixError> {
        let syntax = || PrefixError::Syntax(text.to_owned());
        let (addr_text, len_text) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| syntax())?;
        let max = Prefix::max(addr);
        let len = match len_text {
            None => max,
            Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
                let len: u32 = l.parse().map_err(|_| syntax())?;
                if len > u32::from(max) {
                    let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
                    return Err(PrefixError::TooLong { len, family, max });
                }
                len as u8
            }
            Some(_) => return Err(syntax()),
        };
        let masked = match addr {
            IpAddr::V4(a) => IpAddr::V4(mask4(a, len)),
            IpAddr::V6(a) => IpAddr::V6(mask6(a, len)),
        };
        if let IpAddr::V6(a) = masked {
            if let (Some(v4), true) = (a.to_ipv4_mapped(), len >= 96) {
                let fixed = Prefix {
                    addr: IpAddr::V4(v4),
                    len: len - 96,
                };
                return Err(PrefixError::Mapped {
                    text: text.to_owned(),
                    fixed,
                });
            }
        }
        let prefix = Prefix { addr: masked, len };
        if masked != addr {
            return Err(PrefixError::HostBits {
                text: text.to_owned(),
                len,
                fixed: prefix,
            });
        }
        Ok(prefix)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// One route's source rules. The default (no lists, no rate) passes everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceRules {
    /// `allow`: only these sources may connect; `None`: every source. Never `Some(empty)`
    /// (the configuration refuses an empty list).
    pub allow: Option<Vec<Prefix>>,
    /// `deny`: never these sources (deny wins over allow).
    pub deny: Vec<Prefix>,
    /// `syn_rate`: new connections per second per source (IPv4 /32, IPv6 /64), bursts up to
    /// twice that.
    pub syn_rate: Option<u32>,
}

/// Why a source was refused; the label is the `reason` of the metrics and of `spliced status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Denied, or not in the allow list.
    Acl,
    /// Over the route's `syn_rate`.
    SynRate,
}

impl Reason {
    /// Both reasons, in counter order.
    pub const ALL: [Reason; 2] = [Reason::Acl, Reason::SynRate];

    /// The label in metrics and status: `acl`, `syn_rate`.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Acl => "acl",
            Reason::SynRate => "syn_rate",
        }
    }

    /// The reason's index in the drop counters (`XDP_REASON_*`).
    pub fn index(self) -> u32 {
        match self {
            Reason::Acl => proxy_common::XDP_REASON_ACL,
            Reason::SynRate => proxy_common::XDP_REASON_SYN_RATE,
        }
    }
}

impl SourceRules {
    /// Whether any rule is set (a route without rules costs the XDP front one lookup).
    pub fn is_empty(&self) -> bool {
        self.allow.is_none() && self.deny.is_empty() && self.syn_rate.is_none()
    }

    /// The ACL's verdict on `source`: `Err(Reason::Acl)` when denied or not allowed.
    pub fn admits(&self, source: IpAddr) -> Result<(), Reason> {
        if self.deny.iter().any(|p| p.contains(source)) {
            return Err(Reason::Acl);
        }
        match &self.allow {
            Some(allow) if !allow.iter().any(|p| p.contains(source)) => Err(Reason::Acl),
            _ => Ok(()),
        }
    }

    /// The rules as `spliced check` lists them, one line each (empty when there are none).
    pub fn describe(&self) -> Vec<String> {
        let list = |p: &[Prefix]| {
            p.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut lines = Vec::new();
        if !self.deny.is_empty() {
            lines.push(format!("deny {}", list(&self.deny)));
        }
        match &self.allow {
            Some(allow) => lines.push(format!("allow only {}", list(allow))),
            None if !self.deny.is_empty() => lines.push("allow every other source".into()),
            None => {}
        }
        if let Some(rate) = self.syn_rate {
            lines.push(format!(
                "syn_rate {rate}/s per source (IPv4 /32, IPv6 /64), bursts up to {}",
                u64::from(rate) * 2
            ));
        }
        lines
    }
}

/// One route as the XDP front sees it: its bound listen addresses and its rules.
#[derive(Clone, Debug)]
pub struct RouteRules {
    pub name: String,
    /// The addresses the route's listeners are bound to (port included).
    pub listen: Vec<SocketAddr>,
    pub rules: SourceRules,
}

/// Stable route ids across reloads: a route keeps its id (its counters and map keys) while
/// its name stays; a removed route's id is reused only by a later new route.
#[derive(Clone, Debug, Default)]
pub struct RouteIds {
    ids: BTreeMap<String, u32>,
}

/// More routes than the XDP front has slots for.
#[derive(Debug, thiserror::Error)]
#[error("more than {XDP_MAX_ROUTES} routes: the XDP front has no slot for route {0:?}")]
pub struct TooManyRoutes(pub String);

impl RouteIds {
    /// Keeps the ids of `names` (assigning free ones to new names) and forgets the others.
    /// Returns the ids that are new (their counters start again from whatever they hold).
    pub fn assign<'a>(
        &mut self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<u32>, TooManyRoutes> {
        let names: BTreeSet<&str> = names.into_iter().collect();
        // Ids freed now are taken last: their old prefixes leave the maps only at the end of
        // the update, and a new route must not see them meanwhile.
        let freed: BTreeSet<u32> = self
            .ids
            .iter()
            .filter(|(name, _)| !names.contains(name.as_str()))
            .map(|(_, id)| *id)
            .collect();
        self.ids.retain(|name, _| names.contains(name.as_str()));
        let mut fresh = Vec::new();
        for name in names {
            if self.ids.contains_key(name) {
                continue;
            }
            let used: BTreeSet<u32> = self.ids.values().copied().collect();
            let id = (0..XDP_MAX_ROUTES)
                .find(|id| !used.contains(id) && !freed.contains(id))
                .or_else(|| (0..XDP_MAX_ROUTES).find(|id| !used.contains(id)))
                .ok_or_else(|| TooManyRoutes(name.to_owned()))?;
            self.ids.insert(name.to_owned(), id);
            fresh.push(id);
        }
        Ok(fresh)
    }

    /// The id of route `name`, if assigned.
    pub fn get(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    /// Every (name, id).
    pub fn iter(&self) -> impl Iterator<Item = (&str, u32)> {
        self.ids.iter().map(|(n, id)| (n.as_str(), *id))
    }
}

/// The complete contents of the XDP front's rule maps for one configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapPlan {
    pub routes: BTreeMap<XdpRouteKey, XdpRoute>,
    pub allow: BTreeSet<(u32, XdpPrefixKey)>,
    pub deny: BTreeSet<(u32, XdpPrefixKey)>,
}

/// The XDP key of a listen address: IPv4 as IPv4-mapped, the wildcard as the family's.
pub fn route_key(ip: IpAddr, port: u16) -> XdpRouteKey {
    let addr = match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    XdpRouteKey { addr, port, pad: 0 }
}

impl MapPlan {
    /// Compiles `routes` with the ids in `ids` (see [`RouteIds::assign`]). A `[::]` listener
    /// also gets the IPv4 wildcard key: spliced leaves IPV6_V6ONLY off, so it takes IPv4 too.
    pub fn compile(routes: &[RouteRules], ids: &RouteIds) -> MapPlan {
        let mut plan = MapPlan::default();
        for route in routes {
            let Some(id) = ids.get(&route.name) else {
                continue;
            };
            let rules = &route.rules;
            let mut flags = 0;
            if let Some(allow) = &rules.allow {
                flags |= XDP_ROUTE_HAS_ALLOW;
                plan.allow.extend(allow.iter().map(|p| p.trie_key(id)));
            }
            if !rules.deny.is_empty() {
                flags |= XDP_ROUTE_HAS_DENY;
                plan.deny.extend(rules.deny.iter().map(|p| p.trie_key(id)));
            }
            let value = XdpRoute {
                id,
                flags,
                syn_rate: rules.syn_rate.unwrap_or(0),
                pad: 0,
            };
            for addr in &route.listen {
                plan.routes.insert(route_key(addr.ip(), addr.port()), value);
                if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
                    let v4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
                    plan.routes.insert(route_key(v4, addr.port()), value);
                }
            }
        }
        plan
    }

    /// The map operations that take the maps from `self` to `next`, in an order that never
    /// leaves a moment with neither the old nor the new rules in force: new prefixes first
    /// (inert until a route's flag points at them), then the routes, then the removals.
    pub fn changes_to(&self, next: &MapPlan) -> Vec<MapOp> {
        let mut ops = Vec::new();
        ops.extend(
            next.deny
                .difference(&self.deny)
                .map(|k| MapOp::InsertDeny(*k)),
        );
        ops.extend(
            next.allow
                .difference(&self.allow)
                .map(|k| MapOp::InsertAllow(*k)),
        );
        for (key, value) in &next.routes {
            if self.routes.get(key) != Some(value) {
                ops.push(MapOp::SetRoute(*key, *value));
            }
        }
        for key in self.routes.keys() {
            if !next.routes.contains_key(key) {
                ops.push(MapOp::RemoveRoute(*key));
            }
        }
        ops.extend(
            self.allow
                .difference(&next.allow)
                .map(|k| MapOp::RemoveAllow(*k)),
        );
        ops.extend(
            self.deny
                .difference(&next.deny)
                .map(|k| MapOp::RemoveDeny(*k)),
        );
        ops
    }
}

/// One map update of [`MapPlan::changes_to`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    InsertDeny((u32, XdpPrefixKey)),
    InsertAllow((u32, XdpPrefixKey)),
    SetRoute(XdpRouteKey, XdpRoute),
    RemoveRoute(XdpRouteKey),
    RemoveAllow((u32, XdpPrefixKey)),
    RemoveDeny((u32, XdpPrefixKey)),
}
