//! The PROXY protocol (HAProxy's v1 text and v2 binary headers): written to upstreams so they
//! learn the client's address, and read from trusted front proxies. The header format itself is
//! the `ppp` crate's; this module decides what goes in and bounds what is read.
mod accept;
mod send;

use std::fmt;
use std::net::SocketAddr;

pub use accept::{parse, read_header, Parsed, Progress, Rejected, MAX_V1, MAX_V2_PAYLOAD};
pub use send::{encode, Seen};

/// Which header a route sends (`proxy_protocol = "v1"` or `"v2"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The text header: addresses only.
    V1,
    /// The binary header: addresses, and the name and ALPN the peek saw as TLVs.
    V2,
}

impl Version {
    /// The configuration's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }

    /// Parses the configuration's name.
    pub fn parse(text: &str) -> Option<Version> {
        match text {
            "v1" => Some(Version::V1),
            "v2" => Some(Version::V2),
            _ => None,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How reading a trusted source's header ended: the `outcome` label of
/// `spliced_proxy_header_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A PROXY command: the connection is the header's client's.
    Proxied,
    /// v2 `LOCAL` or v1 `UNKNOWN`: the front proxy's own connection.
    Local,
    /// Rejected (the connection is closed): the first bytes are not a header.
    Missing,
    /// Rejected: longer than the bounds ([`MAX_V1`], [`MAX_V2_PAYLOAD`]).
    TooLong,
    /// Rejected: a header that breaks its format.
    Malformed,
    /// Rejected: the front proxy closed before the header was complete.
    Truncated,
    /// Rejected: no complete header within the route's `peek_timeout`.
    Timeout,
    /// Rejected: reading failed (a reset).
    ReadError,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 8] = [
        Outcome::Proxied,
        Outcome::Local,
        Outcome::Missing,
        Outcome::TooLong,
        Outcome::Malformed,
        Outcome::Truncated,
        Outcome::Timeout,
        Outcome::ReadError,
    ];

    /// The label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Proxied => "proxied",
            Outcome::Local => "local",
            Outcome::Missing => "missing",
            Outcome::TooLong => "too_long",
            Outcome::Malformed => "malformed",
            Outcome::Truncated => "truncated",
            Outcome::Timeout => "timeout",
            Outcome::ReadError => "read_error",
        }
    }

    /// The index in [`Outcome::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Where a connection really comes from and goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The client.
    pub source: SocketAddr,
    /// The address the client connected to.
    pub destination: SocketAddr,
}

#[cfg(test)]
mod tests;
