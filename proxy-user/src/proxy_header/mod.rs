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
