//! The text of an address: brackets, zones, ports, host names, with a fix for each mistake.
use std::net::{IpAddr, Ipv6Addr};

use super::{validate_interface_name, AddrError, Endpoint, Host, Zone};

/// One problem with the text, before the input is quoted in front of it. The message is the
/// whole error: text has no underlying cause to keep.
pub(super) struct Bad(String);

impl From<String> for Bad {
    fn from(s: String) -> Bad {
        Bad(s)
    }
}

macro_rules! bad {
    ($($arg:tt)*) => { Bad(format!($($arg)*)) };
}

/// The longest DNS name, without a trailing dot (RFC 1035).
const MAX_HOST_NAME: usize = 253;

/// The longest DNS label (RFC 1035).
const MAX_LABEL: usize = 63;

/// What the address is for: listen addresses may use port 0 but no host names.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Upstream,
    Listen,
}

/// Whether the kernel needs a scope (zone) to know which link an IPv6 address is on:
/// link-local unicast (fe80::/10).
fn needs_zone(ip: &Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// Whether a zone may be given: link-local unicast, and interface- or link-local multicast
/// (ffx1::/16, ffx2::/16).
fn takes_zone(ip: &Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    needs_zone(ip) || (first & 0xff00 == 0xff00 && matches!(first & 0x000f, 1 | 2))
}

pub(super) fn parse(s: &str, role: Role) -> Result<Endpoint, AddrError> {
    let fail = |what: Bad| AddrError::Invalid(format!("{s:?}: {}", what.0));
    if s.is_empty() {
        return Err(fail(
            "the address is empty; write HOST:PORT, e.g. \"127.0.0.1:8080\""
                .to_owned()
                .into(),
        ));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        let cleaned: String = s
            .chars()
            .filter(|c| !c.is_whitespace() && !c.is_control())
            .collect();
        return Err(fail(bad!(
            "the address contains whitespace; remove it: \"{cleaned}\""
        )));
    }
    if let Some(inner) = s.strip_prefix('[') {
        return parse_bracketed(s, inner, role).map_err(fail);
    }
    match s.matches(':').count() {
        0 => Err(fail(bad!(
            "missing port; write \"{s}:PORT\", e.g. \"{s}:{}\"",
            example_port(role)
        ))),
        1 => {
            let (host, port) = s.split_once(':').unwrap_or((s, ""));
            parse_unbracketed(host, port, role).map_err(fail)
        }
        _ => Err(fail(Bad(bare_ipv6_hint(s, role)))),
    }
}

fn example_port(role: Role) -> u16 {
    match role {
        Role::Upstream => 80,
        Role::Listen => 8080,
    }
}

/// `[ipv6]:port` or `[ipv6%zone]:port`; `inner` is the text after the '['.
fn parse_bracketed(s: &str, inner: &str, role: Role) -> Result<Endpoint, Bad> {
    let Some((inside, rest)) = inner.split_once(']') else {
        return Err(
            "an opening \"[\" needs a closing \"]\"; write \"[IPV6]:PORT\", e.g. \
             \"[2001:db8::1]:80\""
                .to_owned()
                .into(),
        );
    };
    let (ip_text, zone_text) = match inside.split_once('%') {
        Some((ip, zone)) => (ip, Some(zone)),
        None => (inside, None),
    };
    let port_text = match rest.strip_prefix(':') {
        Some(port) => port,
        None if rest.is_empty() => {
            return Err(bad!(
                "missing port; write \"{s}:PORT\", e.g. \"{s}:{}\"",
                example_port(role)
            ))
        }
        None => {
            return Err(bad!(
                "unexpected {rest:?} after \"]\"; write \"[{inside}]:PORT\""
            ))
        }
    };
    if ip_text.is_empty() {
        return Err(
            "the brackets are empty; put an IPv6 address inside, e.g. \"[::1]:80\""
                .to_owned()
                .into(),
        );
    }
    let ip = match ip_text.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => ip,
        Ok(IpAddr::V4(_)) => {
            return Err(bad!(
                "brackets are only for IPv6 addresses; write \"{ip_text}:{port_text}\""
            ))
        }
        Err(_) if validate_host_name(ip_text).is_ok() && role == Role::Upstream => {
            return Err(bad!(
                "host names go without brackets; write \"{ip_text}:{port_text}\""
            ))
        }
        Err(_) => {
            return Err(bad!(
                "{ip_text:?} is not a valid IPv6 address, e.g. \"[2001:db8::1]:80\""
            ))
        }
    };
    let port = parse_port(port_text, &format!("[{inside}]"), role)?;
    let zone = match zone_text {
        Some(text) => Some(parse_zone(&ip, text, port)?),
        None if needs_zone(&ip) => {
            return Err(bad!(
                "{ip} is a link-local address (fe80::/10), which exists on every interface; \
                 name the interface with \"%\", e.g. \"[{ip}%eth0]:{port}\""
            ))
        }
        None => None,
    };
    Ok(Endpoint {
        host: Host::Ip(IpAddr::V6(ip)),
        zone,
        port,
    })
}

fn parse_zone(ip: &Ipv6Addr, text: &str, port: u16) -> Result<Zone, Bad> {
    if text.is_empty() {
        return Err(bad!(
            "the zone after \"%\" is empty; name the interface, e.g. \"[{ip}%eth0]:{port}\""
        ));
    }
    if !takes_zone(ip) {
        return Err(bad!(
            "a zone (\"%{text}\") only applies to link-local addresses (fe80::/10 and \
             link-local multicast); {ip} is routed by the address alone: write \
             \"[{ip}]:{port}\" (to pin the route to an interface, use the route key \
             `interface`)"
        ));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<u32>() {
            Ok(0) => Err(bad!(
                "zone index 0 names no interface; use the interface's name or index, e.g. \
                 \"[{ip}%eth0]:{port}\" (ip link shows both)"
            )),
            Ok(index) => Ok(Zone::Index(index)),
            Err(_) => Err(bad!(
                "zone index {text} is too large; use the interface's name, e.g. \
                 \"[{ip}%eth0]:{port}\""
            )),
        };
    }
    validate_interface_name(text).map_err(|e| Bad(e.to_string()))?;
    Ok(Zone::Name(text.to_owned()))
}

/// `ipv4:port` or `name:port`, already split at the only ':'.
fn parse_unbracketed(host: &str, port_text: &str, role: Role) -> Result<Endpoint, Bad> {
    if host.is_empty() || host == "*" {
        return Err(Bad(match role {
            Role::Listen => format!(
                "missing host; to listen on every interface write \"0.0.0.0:{port_text}\" or \
                 \"[::]:{port_text}\", to listen locally \"127.0.0.1:{port_text}\""
            ),
            Role::Upstream => {
                format!("missing host; write HOST:PORT, e.g. \"127.0.0.1:{port_text}\"")
            }
        }));
    }
    if let Some((ip_text, zone)) = host.split_once('%') {
        return Err(Bad(if ip_text.parse::<std::net::Ipv4Addr>().is_ok() {
            format!(
                "a zone (\"%{zone}\") only applies to IPv6 link-local addresses, not IPv4; \
                 remove it: write \"{ip_text}:{port_text}\""
            )
        } else {
            "\"%\" (a zone) is only valid inside a bracketed IPv6 address, e.g. \
             \"[fe80::1%eth0]:80\""
                .to_owned()
        }));
    }
    let port = parse_port(port_text, host, role)?;
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        return Ok(Endpoint {
            host: Host::Ip(IpAddr::V4(ip)),
            zone: None,
            port,
        });
    }
    if looks_like_ipv4(host) {
        return Err(bad!(
            "{host:?} is not a valid IPv4 address (four numbers 0-255, e.g. \"10.0.0.1\")"
        ));
    }
    validate_host_name(host)?;
    if role == Role::Listen {
        let example = if host.eq_ignore_ascii_case("localhost") {
            format!("\"127.0.0.1:{port}\" or \"[::1]:{port}\"")
        } else {
            format!("\"127.0.0.1:{port}\" or \"[::]:{port}\"")
        };
        return Err(bad!(
            "listen addresses must be IP literals, not host names; write e.g. {example}"
        ));
    }
    Ok(Endpoint {
        host: Host::Name(host.to_owned()),
        zone: None,
        port,
    })
}

/// A top-level label that is all digits cannot be a DNS name (RFC 3696 §2), so the text was
/// meant as an IPv4 address.
fn looks_like_ipv4(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    host.rsplit('.')
        .next()
        .is_some_and(|last| !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
}

/// Builds the message for an address with two or more ':' outside brackets: an IPv6 address
/// that needs brackets, with a corrected spelling when one can be guessed.
fn bare_ipv6_hint(s: &str, role: Role) -> String {
    let strip_zone = |t: &str| t.split_once('%').map_or(t, |(ip, _)| ip).to_owned();
    if let Some((left, port)) = s.rsplit_once(':') {
        if let (Ok(ip), Ok(_)) = (strip_zone(left).parse::<Ipv6Addr>(), port.parse::<u16>()) {
            let mut hint = format!("an IPv6 address needs brackets: write \"[{left}]:{port}\"");
            if needs_zone(&ip) && !left.contains('%') {
                hint.push_str(&format!(
                    " (a link-local address also needs its interface: \"[{left}%eth0]:{port}\")"
                ));
            }
            return hint;
        }
    }
    if strip_zone(s).parse::<Ipv6Addr>().is_ok() {
        return format!(
            "an IPv6 address needs brackets and a port: write \"[{s}]:PORT\", e.g. \"[{s}]:{}\"",
            example_port(role)
        );
    }
    "too many \":\" for HOST:PORT; an IPv6 address goes in brackets, e.g. \
     \"[fe80::1%eth0]:80\" or \"[2001:db8::1]:80\""
        .to_owned()
}

fn parse_port(text: &str, host: &str, role: Role) -> Result<u16, Bad> {
    if text.is_empty() {
        return Err(bad!(
            "missing port after \":\"; write \"{host}:PORT\", e.g. \"{host}:{}\"",
            example_port(role)
        ));
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad!(
            "port {text:?} is not a number; use a port number from 1 to 65535"
        ));
    }
    let port = match text.parse::<u16>() {
        Ok(port) => port,
        Err(_) => return Err(bad!("port {text} is out of range; use 1 to 65535")),
    };
    if port == 0 && role == Role::Upstream {
        return Err(
            "port 0 is not a valid upstream port; use 1 to 65535 (port 0 only means \"any free \
             port\" in a listen address)"
                .to_owned()
                .into(),
        );
    }
    Ok(port)
}

/// Checks a DNS host name: labels of letters, digits and '-', 1 to 63 bytes, not starting or
/// ending with '-', at most 253 bytes in all; one trailing dot (a rooted name) is allowed.
fn validate_host_name(name: &str) -> Result<(), Bad> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.len() > MAX_HOST_NAME {
        return Err(bad!(
            "the host name is {} bytes long; the limit is {MAX_HOST_NAME}",
            bare.len()
        ));
    }
    for label in bare.split('.') {
        if label.is_empty() {
            return Err(bad!(
                "host name {name:?} has an empty label (a leading dot or two dots in a row); \
                 write e.g. \"example.com\""
            ));
        }
        if label.len() > MAX_LABEL {
            return Err(bad!(
                "label {label:?} of the host name is {} bytes long; the limit is {MAX_LABEL}",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !c.is_ascii_alphanumeric() && *c != '-')
        {
            return Err(bad!(
                "host name {name:?} contains {c:?}; host names may only contain letters, \
                 digits, '-' and '.'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad!(
                "label {label:?} of the host name starts or ends with '-', which DNS labels \
                 cannot"
            ));
        }
    }
    Ok(())
}
