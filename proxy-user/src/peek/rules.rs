//! A route's match conditions and the first-match-wins choice among them.
use std::fmt;

use super::{NamePattern, Peeked, Protocol};

/// The conditions of one `[[route.match]]`: every one given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Match {
    /// The TLS server name is one of these (implies TLS).
    pub sni: Vec<NamePattern>,
    /// The client offered one of these ALPN protocols (implies TLS).
    pub alpn: Vec<String>,
    /// The HTTP Host (port ignored) is one of these (implies HTTP).
    pub host: Vec<NamePattern>,
    /// The detected protocol is this one.
    pub protocol: Option<Protocol>,
}

impl Match {
    /// Whether what the peek saw meets every condition given.
    pub fn matches(&self, seen: &Peeked) -> bool {
        let name_in = |patterns: &[NamePattern]| {
            seen.name
                .as_deref()
                .is_some_and(|name| patterns.iter().any(|p| p.matches(name)))
        };
        let tls = seen.protocol == Protocol::Tls;
        let http = seen.protocol == Protocol::Http;
        (self.sni.is_empty() || (tls && name_in(&self.sni)))
            && (self.host.is_empty() || (http && name_in(&self.host)))
            && (self.alpn.is_empty() || (tls && seen.alpn.iter().any(|a| self.alpn.contains(a))))
            && self.protocol.is_none_or(|p| p == seen.protocol)
    }

    /// Why the conditions can never hold together, if they cannot.
    pub fn contradiction(&self) -> Option<&'static str> {
        let needs_tls = !self.sni.is_empty() || !self.alpn.is_empty();
        let needs_http = !self.host.is_empty();
        match self.protocol {
            _ if needs_tls && needs_http => {
                Some("sni/alpn (TLS) and host (HTTP) never hold together")
            }
            Some(Protocol::Tls) if needs_http => Some("host needs protocol \"http\", not \"tls\""),
            Some(Protocol::Http) if needs_tls => {
                Some("sni and alpn need protocol \"tls\", not \"http\"")
            }
            Some(Protocol::Other) if needs_tls || needs_http => {
                Some("sni, alpn and host never hold with protocol \"other\"")
            }
            _ => None,
        }
    }

    /// A match with no condition at all, which every connection meets.
    pub fn is_empty(&self) -> bool {
        self == &Match::default()
    }
}

/// The index of the first match `seen` meets, in order.
pub fn first_match<'a>(rules: impl IntoIterator<Item = &'a Match>, seen: &Peeked) -> Option<usize> {
    rules.into_iter().position(|rule| rule.matches(seen))
}

impl fmt::Display for Match {
    /// `sni=blog.example.com,*.example.org alpn=h2`: the form `spliced check` and logs use.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let join = |v: &[NamePattern]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        if !self.sni.is_empty() {
            parts.push(format!("sni={}", join(&self.sni)));
        }
        if !self.alpn.is_empty() {
            parts.push(format!("alpn={}", self.alpn.join(",")));
        }
        if !self.host.is_empty() {
            parts.push(format!("host={}", join(&self.host)));
        }
        if let Some(p) = self.protocol {
            parts.push(format!("protocol={p}"));
        }
        if parts.is_empty() {
            return f.write_str("any");
        }
        f.write_str(&parts.join(" "))
    }
}
