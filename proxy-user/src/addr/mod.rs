//! Listen and upstream addresses.
//!
//! An [`Endpoint`] is written `ip:port`, `[ipv6]:port`, `[ipv6%zone]:port` or `name:port`.
//! Parsing only checks the text; [`Endpoint::resolve`] turns it into socket addresses at the
//! moment of use, because both halves can change while the daemon runs: a host name's records,
//! and an interface's index (a veth or bridge that is deleted and re-created gets a new one).
//!
//! Every error is an [`AddrError`] whose text quotes the input, says what is wrong and how to
//! write it instead.
use std::{
    fmt,
    net::{IpAddr, SocketAddr, SocketAddrV6},
    str::FromStr,
};

mod iface;
mod kept_index;
mod parse;

pub use iface::{interface_exists, interface_index, interface_name, validate_interface_name};
use parse::Role;

/// An IPv6 zone (scope): an interface name, looked up at every use, or an index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Zone {
    /// `%lxdbr0`: resolved to an index each time the address is used (kept while no link
    /// changes: `kept_index`).
    Name(String),
    /// `%7`: a fixed interface index (all digits).
    Index(u32),
}

/// The host part of an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// An IPv4 or IPv6 literal.
    Ip(IpAddr),
    /// A DNS name (or an `/etc/hosts` name), resolved at every use.
    Name(String),
}

/// `ip:port`, `[ipv6%zone]:port` or `name:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: Host,
    pub zone: Option<Zone>,
    pub port: u16,
}

/// A malformed or unusable address. Every text quotes the input, says what is wrong and how to
/// write it instead.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    /// The text is not an address of this kind.
    #[error("{0}")]
    Invalid(String),
    /// No interface has this name now.
    #[error("interface {name:?} does not exist (ip link shows the interfaces)")]
    NoInterface { name: String },
    /// Looking the interface up failed (for instance out of descriptors).
    #[error("cannot look up interface {name:?}: {source}")]
    InterfaceLookup {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// The zone of `endpoint` names no interface now.
    #[error("cannot use \"{endpoint}\": {source}")]
    Zone {
        endpoint: String,
        #[source]
        source: Box<AddrError>,
    },
    /// The host name did not resolve.
    #[error(
        "cannot resolve host name {name:?}: {source}; check the name, /etc/hosts and the DNS \
         servers, or use an IP address"
    )]
    Lookup {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// The host name resolved to nothing.
    #[error(
        "host name {name:?} resolved to no address; check its DNS records or use an IP address"
    )]
    NoAddress { name: String },
}

/// The longest interface name Linux accepts (`IFNAMSIZ` minus the terminating NUL).
pub const MAX_INTERFACE_NAME: usize = 15;

impl FromStr for Endpoint {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, AddrError> {
        parse::parse(s, Role::Upstream)
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Zone::Name(name) => f.write_str(name),
            Zone::Index(index) => write!(f, "{index}"),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

impl fmt::Display for Endpoint {
    /// Writes the address back in the form [`Endpoint::from_str`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let zone = match &self.zone {
            Some(zone) => format!("%{zone}"),
            None => String::new(),
        };
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}{zone}]:{}", self.port),
            host => write!(f, "{host}{zone}:{}", self.port),
        }
    }
}

impl Endpoint {
    /// Parses a listen address: like `from_str`, but host names are refused (a name could
    /// resolve to an address of another machine, or to several) and port 0 (any free port) is
    /// allowed.
    pub fn parse_listen(s: &str) -> Result<Self, AddrError> {
        parse::parse(s, Role::Listen)
    }

    /// The zone's interface name, if the zone is given by name.
    pub fn zone_name(&self) -> Option<&str> {
        match &self.zone {
            Some(Zone::Name(name)) => Some(name),
            _ => None,
        }
    }

    /// Resolves now: zone names via if_nametoindex, host names via getaddrinfo.
    ///
    /// Call it at every use rather than caching the result: an interface that is re-created
    /// gets a new index, and a host name can move. A zoned address comes back as a
    /// [`SocketAddrV6`] with its `scope_id` set.
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, AddrError> {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => {
                let scope_id = match &self.zone {
                    None => 0,
                    Some(Zone::Name(name)) => {
                        kept_index::index(name).map_err(|e| AddrError::Zone {
                            endpoint: self.to_string(),
                            source: Box::new(e),
                        })?
                    }
                    Some(Zone::Index(index)) => {
                        if interface_name(*index).is_none() {
                            return Err(AddrError::Invalid(format!(
                                "cannot use \"{self}\": there is no interface with index {index} \
                                 (ip link lists the interfaces with their indexes); \
                                 prefer the interface's name, e.g. \"%eth0\""
                            )));
                        }
                        *index
                    }
                };
                Ok(vec![SocketAddr::V6(SocketAddrV6::new(
                    *ip, self.port, 0, scope_id,
                ))])
            }
            Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, self.port)]),
            Host::Name(name) => {
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), self.port))
                    .await
                    .map_err(|source| AddrError::Lookup {
                        name: name.clone(),
                        source,
                    })?
                    .collect();
                if addrs.is_empty() {
                    return Err(AddrError::NoAddress { name: name.clone() });
                }
                Ok(addrs)
            }
        }
    }
}

#[cfg(test)]
mod tests;
