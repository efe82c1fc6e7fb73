//! The header spliced writes to an upstream before any client byte.
use std::net::{IpAddr, SocketAddr};

use ppp::v2;

use super::{Origin, Version};

/// What the peek saw, for v2's TLVs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen<'a> {
    /// The TLS server name or HTTP host: `PP2_TYPE_AUTHORITY`.
    pub authority: Option<&'a str>,
    /// The application protocol, when it is known: `PP2_TYPE_ALPN`. The peek sees only what the
    /// client offers, so callers pass it only when the client offered exactly one.
    pub alpn: Option<&'a str>,
}

/// The header for a connection from `origin` (the client's family: an IPv4 client behind an
/// IPv6 listener is written as IPv4).
pub fn encode(version: Version, origin: Origin, seen: Seen<'_>) -> Vec<u8> {
    let (source, destination) = same_family(origin.source, origin.destination);
    match version {
        Version::V1 => {
            let addresses = ppp::v1::Addresses::from((source, destination));
            addresses.to_string().into_bytes()
        }
        Version::V2 => {
            let command = v2::Version::Two | v2::Command::Proxy;
            let mut builder =
                v2::Builder::with_addresses(command, v2::Protocol::Stream, (source, destination));
            let tlvs = [
                (v2::Type::Authority, seen.authority),
                (v2::Type::ALPN, seen.alpn),
            ];
            for (kind, value) in tlvs {
                if let Some(value) = value {
                    builder = builder
                        .write_tlv(kind, value.as_bytes())
                        // Writes into a Vec; TLV values here are at most 255 bytes (a DNS
                        // name, an ALPN id), so neither the Vec nor the u16 length can fail.
                        .expect("writing a TLV into a Vec cannot fail");
                }
            }
            builder.build().expect("building into a Vec cannot fail")
        }
    }
}

/// Unmaps IPv4-mapped IPv6 addresses (what an IPv6 listener reports for IPv4 clients) so the
/// header carries the client's own family; if the two still differ, both as IPv6.
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let unmap = |a: SocketAddr| match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    };
    let (s, d) = (unmap(source), unmap(destination));
    if s.is_ipv4() == d.is_ipv4() {
        return (s, d);
    }
    let map = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    (map(s), map(d))
}
