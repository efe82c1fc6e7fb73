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
    ffi::{CStr, CString},
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6},
    str::FromStr,
};

/// An IPv6 zone (scope): an interface name, looked up at every use, or an index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Zone {
    /// `%lxdbr0`: resolved to an index by `if_nametoindex` each time the address is used.
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

/// A malformed or unresolvable address.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AddrError(pub String);

/// The longest interface name Linux accepts (`IFNAMSIZ` minus the terminating NUL).
pub const MAX_INTERFACE_NAME: usize = 15;

/// The longest DNS name, without a trailing dot (RFC 1035).
const MAX_HOST_NAME: usize = 253;

/// The longest DNS label (RFC 1035).
const MAX_LABEL: usize = 63;

/// What the address is for: listen addresses may use port 0 but no host names.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Upstream,
    Listen,
}

impl FromStr for Endpoint {
    type Err = AddrError;

    /// Parses an upstream address: an IP literal or a host name, and a port from 1 to 65535.
    fn from_str(s: &str) -> Result<Self, AddrError> {
        parse(s, Role::Upstream)
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
        parse(s, Role::Listen)
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
                    Some(Zone::Name(name)) => interface_index(name)
                        .map_err(|e| AddrError(format!("cannot use \"{self}\": {e}")))?,
                    Some(Zone::Index(index)) => {
                        if interface_name(*index).is_none() {
                            return Err(AddrError(format!(
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
                    .map_err(|e| lookup_failed(name, &e))?
                    .collect();
                if addrs.is_empty() {
                    return Err(lookup_empty(name));
                }
                Ok(addrs)
            }
        }
    }
}

fn lookup_failed(name: &str, err: &std::io::Error) -> AddrError {
    AddrError(format!(
        "cannot resolve host name {name:?}: {err}; check the name, /etc/hosts and the DNS \
         servers, or use an IP address"
    ))
}

fn lookup_empty(name: &str) -> AddrError {
    AddrError(format!(
        "host name {name:?} resolved to no address; check its DNS records or use an IP address"
    ))
}

/// The current index of the interface `name`, by `if_nametoindex(3)`.
///
/// The index changes when an interface is deleted and created again, so look it up at every
/// use.
pub fn interface_index(name: &str) -> Result<u32, AddrError> {
    validate_interface_name(name)?;
    let c_name = CString::new(name).map_err(|_| {
        AddrError(format!(
            "interface name {name:?} contains a NUL byte; remove it"
        ))
    })?;
    // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        // if_nametoindex opens a socket for its ioctl: out of descriptors is not "no such
        // interface".
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENODEV) {
            return Err(AddrError(format!("cannot look up interface {name:?}: {e}")));
        }
        return Err(AddrError(format!(
            "interface {name:?} does not exist (ip link shows the interfaces)"
        )));
    }
    Ok(index)
}

/// Whether an interface called `name` exists right now.
pub fn interface_exists(name: &str) -> bool {
    interface_index(name).is_ok()
}

/// The name of the interface with index `index`, if there is one, by `if_indextoname(3)`.
pub fn interface_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write.
    let ret = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if ret.is_null() {
        return None;
    }
    // SAFETY: on success if_indextoname wrote a NUL-terminated name into `buf`.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Checks `name` the way the kernel's `dev_valid_name` does: 1 to 15 bytes, no '/', ':' or
/// whitespace, and not "." or "..".
pub fn validate_interface_name(name: &str) -> Result<(), AddrError> {
    if name.is_empty() {
        return Err(AddrError(
            "the interface name is empty; name an interface, e.g. \"eth0\" (ip link lists them)"
                .to_owned(),
        ));
    }
    if name.len() > MAX_INTERFACE_NAME {
        return Err(AddrError(format!(
            "interface name {name:?} is {} bytes long; Linux interface names have at most {} \
             (ip link lists them)",
            name.len(),
            MAX_INTERFACE_NAME
        )));
    }
    if name == "." || name == ".." {
        return Err(AddrError(format!(
            "{name:?} is not a valid interface name; name an interface, e.g. \"eth0\""
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|&c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(AddrError(format!(
            "interface name {name:?} contains {c:?}, which Linux interface names cannot \
             contain (ip link lists the interfaces)"
        )));
    }
    Ok(())
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

fn parse(s: &str, role: Role) -> Result<Endpoint, AddrError> {
    let fail = |what: String| AddrError(format!("{s:?}: {what}"));
    if s.is_empty() {
        return Err(fail(
            "the address is empty; write HOST:PORT, e.g. \"127.0.0.1:8080\"".to_owned(),
        ));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        let cleaned: String = s
            .chars()
            .filter(|c| !c.is_whitespace() && !c.is_control())
            .collect();
        return Err(fail(format!(
            "the address contains whitespace; remove it: \"{cleaned}\""
        )));
    }
    if let Some(inner) = s.strip_prefix('[') {
        return parse_bracketed(s, inner, role).map_err(fail);
    }
    match s.matches(':').count() {
        0 => Err(fail(format!(
            "missing port; write \"{s}:PORT\", e.g. \"{s}:{}\"",
            example_port(role)
        ))),
        1 => {
            let (host, port) = s.split_once(':').unwrap_or((s, ""));
            parse_unbracketed(host, port, role).map_err(fail)
        }
        _ => Err(fail(bare_ipv6_hint(s, role))),
    }
}

fn example_port(role: Role) -> u16 {
    match role {
        Role::Upstream => 80,
        Role::Listen => 8080,
    }
}

/// `[ipv6]:port` or `[ipv6%zone]:port`; `inner` is the text after the '['.
fn parse_bracketed(s: &str, inner: &str, role: Role) -> Result<Endpoint, String> {
    let Some((inside, rest)) = inner.split_once(']') else {
        return Err(
            "an opening \"[\" needs a closing \"]\"; write \"[IPV6]:PORT\", e.g. \
             \"[2001:db8::1]:80\""
                .to_owned(),
        );
    };
    let (ip_text, zone_text) = match inside.split_once('%') {
        Some((ip, zone)) => (ip, Some(zone)),
        None => (inside, None),
    };
    let port_text = match rest.strip_prefix(':') {
        Some(port) => port,
        None if rest.is_empty() => {
            return Err(format!(
                "missing port; write \"{s}:PORT\", e.g. \"{s}:{}\"",
                example_port(role)
            ))
        }
        None => {
            return Err(format!(
                "unexpected {rest:?} after \"]\"; write \"[{inside}]:PORT\""
            ))
        }
    };
    if ip_text.is_empty() {
        return Err(
            "the brackets are empty; put an IPv6 address inside, e.g. \"[::1]:80\"".to_owned(),
        );
    }
    let ip = match ip_text.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => ip,
        Ok(IpAddr::V4(_)) => {
            return Err(format!(
                "brackets are only for IPv6 addresses; write \"{ip_text}:{port_text}\""
            ))
        }
        Err(_) if validate_host_name(ip_text).is_ok() && role == Role::Upstream => {
            return Err(format!(
                "host names go without brackets; write \"{ip_text}:{port_text}\""
            ))
        }
        Err(_) => {
            return Err(format!(
                "{ip_text:?} is not a valid IPv6 address, e.g. \"[2001:db8::1]:80\""
            ))
        }
    };
    let port = parse_port(port_text, &format!("[{inside}]"), role)?;
    let zone = match zone_text {
        Some(text) => Some(parse_zone(&ip, text, port)?),
        None if needs_zone(&ip) => {
            return Err(format!(
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

fn parse_zone(ip: &Ipv6Addr, text: &str, port: u16) -> Result<Zone, String> {
    if text.is_empty() {
        return Err(format!(
            "the zone after \"%\" is empty; name the interface, e.g. \"[{ip}%eth0]:{port}\""
        ));
    }
    if !takes_zone(ip) {
        return Err(format!(
            "a zone (\"%{text}\") only applies to link-local addresses (fe80::/10 and \
             link-local multicast); {ip} is routed by the address alone: write \
             \"[{ip}]:{port}\" (to pin the route to an interface, use the route key \
             `interface`)"
        ));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<u32>() {
            Ok(0) => Err(format!(
                "zone index 0 names no interface; use the interface's name or index, e.g. \
                 \"[{ip}%eth0]:{port}\" (ip link shows both)"
            )),
            Ok(index) => Ok(Zone::Index(index)),
            Err(_) => Err(format!(
                "zone index {text} is too large; use the interface's name, e.g. \
                 \"[{ip}%eth0]:{port}\""
            )),
        };
    }
    validate_interface_name(text).map_err(|e| e.0)?;
    Ok(Zone::Name(text.to_owned()))
}

/// `ipv4:port` or `name:port`, already split at the only ':'.
fn parse_unbracketed(host: &str, port_text: &str, role: Role) -> Result<Endpoint, String> {
    if host.is_empty() || host == "*" {
        return Err(match role {
            Role::Listen => format!(
                "missing host; to listen on every interface write \"0.0.0.0:{port_text}\" or \
                 \"[::]:{port_text}\", to listen locally \"127.0.0.1:{port_text}\""
            ),
            Role::Upstream => {
                format!("missing host; write HOST:PORT, e.g. \"127.0.0.1:{port_text}\"")
            }
        });
    }
    if let Some((ip_text, zone)) = host.split_once('%') {
        return Err(if ip_text.parse::<std::net::Ipv4Addr>().is_ok() {
            format!(
                "a zone (\"%{zone}\") only applies to IPv6 link-local addresses, not IPv4; \
                 remove it: write \"{ip_text}:{port_text}\""
            )
        } else {
            "\"%\" (a zone) is only valid inside a bracketed IPv6 address, e.g. \
             \"[fe80::1%eth0]:80\""
                .to_owned()
        });
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
        return Err(format!(
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
        return Err(format!(
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

fn parse_port(text: &str, host: &str, role: Role) -> Result<u16, String> {
    if text.is_empty() {
        return Err(format!(
            "missing port after \":\"; write \"{host}:PORT\", e.g. \"{host}:{}\"",
            example_port(role)
        ));
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "port {text:?} is not a number; use a port number from 1 to 65535"
        ));
    }
    let port = match text.parse::<u16>() {
        Ok(port) => port,
        Err(_) => return Err(format!("port {text} is out of range; use 1 to 65535")),
    };
    if port == 0 && role == Role::Upstream {
        return Err(
            "port 0 is not a valid upstream port; use 1 to 65535 (port 0 only means \"any free \
             port\" in a listen address)"
                .to_owned(),
        );
    }
    Ok(port)
}

/// Checks a DNS host name: labels of letters, digits and '-', 1 to 63 bytes, not starting or
/// ending with '-', at most 253 bytes in all; one trailing dot (a rooted name) is allowed.
fn validate_host_name(name: &str) -> Result<(), String> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.len() > MAX_HOST_NAME {
        return Err(format!(
            "the host name is {} bytes long; the limit is {MAX_HOST_NAME}",
            bare.len()
        ));
    }
    for label in bare.split('.') {
        if label.is_empty() {
            return Err(format!(
                "host name {name:?} has an empty label (a leading dot or two dots in a row); \
                 write e.g. \"example.com\""
            ));
        }
        if label.len() > MAX_LABEL {
            return Err(format!(
                "label {label:?} of the host name is {} bytes long; the limit is {MAX_LABEL}",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !c.is_ascii_alphanumeric() && *c != '-')
        {
            return Err(format!(
                "host name {name:?} contains {c:?}; host names may only contain letters, \
                 digits, '-' and '.'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "label {label:?} of the host name starts or ends with '-', which DNS labels \
                 cannot"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ok(s: &str) -> Endpoint {
        s.parse()
            .unwrap_or_else(|e: AddrError| panic!("{s:?} should parse: {e}"))
    }

    fn err(s: &str) -> String {
        match s.parse::<Endpoint>() {
            Ok(e) => panic!("{s:?} should fail, parsed as {e:?}"),
            Err(e) => e.0,
        }
    }

    fn listen_err(s: &str) -> String {
        match Endpoint::parse_listen(s) {
            Ok(e) => panic!("{s:?} should fail, parsed as {e:?}"),
            Err(e) => e.0,
        }
    }

    fn lo_index() -> u32 {
        interface_index("lo").expect("every network namespace has lo")
    }

    #[test]
    fn parses_ipv4() {
        let e = ok("10.0.0.1:80");
        assert_eq!(e.host, Host::Ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
        assert_eq!(e.zone, None);
        assert_eq!(e.port, 80);
    }

    #[test]
    fn parses_ipv6() {
        let e = ok("[2001:db8::1]:80");
        assert_eq!(e.host, Host::Ip("2001:db8::1".parse().unwrap()));
        assert_eq!(e.zone, None);
        assert_eq!(e.port, 80);
    }

    #[test]
    fn parses_zone_name() {
        let e = ok("[fe80::1%lxdbr0]:2368");
        assert_eq!(e.host, Host::Ip("fe80::1".parse().unwrap()));
        assert_eq!(e.zone, Some(Zone::Name("lxdbr0".into())));
        assert_eq!(e.zone_name(), Some("lxdbr0"));
        assert_eq!(e.port, 2368);
    }

    #[test]
    fn parses_zone_index() {
        let e = ok("[fe80::1%7]:2368");
        assert_eq!(e.zone, Some(Zone::Index(7)));
        assert_eq!(e.zone_name(), None);
    }

    #[test]
    fn parses_zone_on_link_local_multicast() {
        assert_eq!(
            ok("[ff02::1%eth0]:80").zone,
            Some(Zone::Name("eth0".into()))
        );
        assert_eq!(ok("[ff01::1%2]:80").zone, Some(Zone::Index(2)));
    }

    #[test]
    fn parses_host_names() {
        for (s, name, port) in [
            ("example.com:80", "example.com", 80),
            ("localhost:80", "localhost", 80),
            ("my-host.lan:8080", "my-host.lan", 8080),
            ("example.com.:443", "example.com.", 443),
            ("a1:65535", "a1", 65535),
        ] {
            let e = ok(s);
            assert_eq!(e.host, Host::Name(name.into()), "{s}");
            assert_eq!(e.port, port, "{s}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "[fe80::1%lxdbr0]:2368",
            "[fe80::1%7]:2368",
            "10.0.0.1:80",
            "name:80",
            "[2001:db8::1]:443",
            "my-host.lan:8080",
        ] {
            assert_eq!(ok(s).to_string(), s);
            assert_eq!(ok(&ok(s).to_string()), ok(s));
        }
        assert_eq!(
            Endpoint::parse_listen("[::]:0").unwrap().to_string(),
            "[::]:0"
        );
    }

    #[test]
    fn display_normalises_ipv6() {
        assert_eq!(ok("[2001:DB8:0:0::1]:80").to_string(), "[2001:db8::1]:80");
    }

    #[test]
    fn listen_accepts_ip_literals_and_port_zero() {
        let e = Endpoint::parse_listen("127.0.0.1:0").unwrap();
        assert_eq!(e.port, 0);
        assert_eq!(Endpoint::parse_listen("[::1]:8080").unwrap().port, 8080);
        assert_eq!(
            Endpoint::parse_listen("[fe80::1%lo]:0").unwrap().zone,
            Some(Zone::Name("lo".into()))
        );
    }

    #[test]
    fn error_empty() {
        assert_eq!(
            err(""),
            r#""": the address is empty; write HOST:PORT, e.g. "127.0.0.1:8080""#
        );
    }

    #[test]
    fn error_whitespace() {
        assert_eq!(
            err("10.0.0.1 :80"),
            r#""10.0.0.1 :80": the address contains whitespace; remove it: "10.0.0.1:80""#
        );
    }

    #[test]
    fn error_missing_port() {
        assert_eq!(
            err("example.com"),
            r#""example.com": missing port; write "example.com:PORT", e.g. "example.com:80""#
        );
        assert_eq!(
            listen_err("127.0.0.1"),
            r#""127.0.0.1": missing port; write "127.0.0.1:PORT", e.g. "127.0.0.1:8080""#
        );
        assert_eq!(
            err("[::1]"),
            r#""[::1]": missing port; write "[::1]:PORT", e.g. "[::1]:80""#
        );
        assert_eq!(
            err("10.0.0.1:"),
            r#""10.0.0.1:": missing port after ":"; write "10.0.0.1:PORT", e.g. "10.0.0.1:80""#
        );
        assert_eq!(
            err("[::1]:"),
            r#""[::1]:": missing port after ":"; write "[::1]:PORT", e.g. "[::1]:80""#
        );
    }

    #[test]
    fn error_bad_port() {
        assert_eq!(
            err("10.0.0.1:http"),
            r#""10.0.0.1:http": port "http" is not a number; use a port number from 1 to 65535"#
        );
        assert_eq!(
            err("10.0.0.1:-1"),
            r#""10.0.0.1:-1": port "-1" is not a number; use a port number from 1 to 65535"#
        );
        assert_eq!(
            err("10.0.0.1:65536"),
            r#""10.0.0.1:65536": port 65536 is out of range; use 1 to 65535"#
        );
        assert_eq!(
            err("10.0.0.1:0"),
            r#""10.0.0.1:0": port 0 is not a valid upstream port; use 1 to 65535 (port 0 only means "any free port" in a listen address)"#
        );
    }

    #[test]
    fn error_bare_ipv6() {
        assert_eq!(
            err("fe80::1:80"),
            r#""fe80::1:80": an IPv6 address needs brackets: write "[fe80::1]:80" (a link-local address also needs its interface: "[fe80::1%eth0]:80")"#
        );
        assert_eq!(
            err("fe80::1%eth0:80"),
            r#""fe80::1%eth0:80": an IPv6 address needs brackets: write "[fe80::1%eth0]:80""#
        );
        assert_eq!(
            err("2001:db8::1:443"),
            r#""2001:db8::1:443": an IPv6 address needs brackets: write "[2001:db8::1]:443""#
        );
        assert_eq!(
            err("2001:db8::abcd"),
            r#""2001:db8::abcd": an IPv6 address needs brackets and a port: write "[2001:db8::abcd]:PORT", e.g. "[2001:db8::abcd]:80""#
        );
        assert_eq!(
            err("a:b:c"),
            r#""a:b:c": too many ":" for HOST:PORT; an IPv6 address goes in brackets, e.g. "[fe80::1%eth0]:80" or "[2001:db8::1]:80""#
        );
    }

    #[test]
    fn error_brackets() {
        assert_eq!(
            err("[::1:80"),
            r#""[::1:80": an opening "[" needs a closing "]"; write "[IPV6]:PORT", e.g. "[2001:db8::1]:80""#
        );
        assert_eq!(
            err("[::1]x:80"),
            r#""[::1]x:80": unexpected "x:80" after "]"; write "[::1]:PORT""#
        );
        assert_eq!(
            err("[]:80"),
            r#""[]:80": the brackets are empty; put an IPv6 address inside, e.g. "[::1]:80""#
        );
        assert_eq!(
            err("[10.0.0.1]:80"),
            r#""[10.0.0.1]:80": brackets are only for IPv6 addresses; write "10.0.0.1:80""#
        );
        assert_eq!(
            err("[example.com]:80"),
            r#""[example.com]:80": host names go without brackets; write "example.com:80""#
        );
        assert_eq!(
            err("[fe80::zz]:80"),
            r#""[fe80::zz]:80": "fe80::zz" is not a valid IPv6 address, e.g. "[2001:db8::1]:80""#
        );
    }

    #[test]
    fn error_link_local_without_zone() {
        assert_eq!(
            err("[fe80::1]:80"),
            r#""[fe80::1]:80": fe80::1 is a link-local address (fe80::/10), which exists on every interface; name the interface with "%", e.g. "[fe80::1%eth0]:80""#
        );
        // The whole of fe80::/10 is link-local.
        assert!(err("[febf::1]:80").contains("link-local"));
        assert_eq!(ok("[fec0::1]:80").zone, None);
    }

    #[test]
    fn error_zone_on_global_ipv6() {
        assert_eq!(
            err("[2001:db8::1%eth0]:80"),
            r#""[2001:db8::1%eth0]:80": a zone ("%eth0") only applies to link-local addresses (fe80::/10 and link-local multicast); 2001:db8::1 is routed by the address alone: write "[2001:db8::1]:80" (to pin the route to an interface, use the route key `interface`)"#
        );
        assert!(err("[ff05::1%eth0]:80").contains("only applies to link-local"));
    }

    #[test]
    fn error_zone_on_ipv4() {
        assert_eq!(
            err("10.0.0.1%eth0:80"),
            r#""10.0.0.1%eth0:80": a zone ("%eth0") only applies to IPv6 link-local addresses, not IPv4; remove it: write "10.0.0.1:80""#
        );
        assert_eq!(
            err("host%eth0:80"),
            r#""host%eth0:80": "%" (a zone) is only valid inside a bracketed IPv6 address, e.g. "[fe80::1%eth0]:80""#
        );
    }

    #[test]
    fn error_bad_zone() {
        assert_eq!(
            err("[fe80::1%]:80"),
            r#""[fe80::1%]:80": the zone after "%" is empty; name the interface, e.g. "[fe80::1%eth0]:80""#
        );
        assert_eq!(
            err("[fe80::1%0]:80"),
            r#""[fe80::1%0]:80": zone index 0 names no interface; use the interface's name or index, e.g. "[fe80::1%eth0]:80" (ip link shows both)"#
        );
        assert_eq!(
            err("[fe80::1%99999999999]:80"),
            r#""[fe80::1%99999999999]:80": zone index 99999999999 is too large; use the interface's name, e.g. "[fe80::1%eth0]:80""#
        );
        assert_eq!(
            err("[fe80::1%averyveryverylongname]:80"),
            r#""[fe80::1%averyveryverylongname]:80": interface name "averyveryverylongname" is 21 bytes long; Linux interface names have at most 15 (ip link lists them)"#
        );
        assert_eq!(
            err("[fe80::1%a/b]:80"),
            r#""[fe80::1%a/b]:80": interface name "a/b" contains '/', which Linux interface names cannot contain (ip link lists the interfaces)"#
        );
        assert_eq!(
            err("[fe80::1%..]:80"),
            r#""[fe80::1%..]:80": ".." is not a valid interface name; name an interface, e.g. "eth0""#
        );
        // The longest valid name is accepted.
        assert_eq!(
            ok("[fe80::1%abcdefghijklmno]:80").zone_name(),
            Some("abcdefghijklmno")
        );
    }

    #[test]
    fn error_missing_host() {
        assert_eq!(
            err(":80"),
            r#"":80": missing host; write HOST:PORT, e.g. "127.0.0.1:80""#
        );
        assert_eq!(
            listen_err(":8080"),
            r#"":8080": missing host; to listen on every interface write "0.0.0.0:8080" or "[::]:8080", to listen locally "127.0.0.1:8080""#
        );
        assert!(listen_err("*:8080").contains("0.0.0.0:8080"));
    }

    #[test]
    fn error_bad_ipv4() {
        assert_eq!(
            err("10.0.0.256:80"),
            r#""10.0.0.256:80": "10.0.0.256" is not a valid IPv4 address (four numbers 0-255, e.g. "10.0.0.1")"#
        );
        assert!(err("10.0.1:80").contains("not a valid IPv4 address"));
    }

    #[test]
    fn error_bad_host_names() {
        assert_eq!(
            err("my_host:80"),
            r#""my_host:80": host name "my_host" contains '_'; host names may only contain letters, digits, '-' and '.'"#
        );
        assert_eq!(
            err("a..b:80"),
            r#""a..b:80": host name "a..b" has an empty label (a leading dot or two dots in a row); write e.g. "example.com""#
        );
        assert_eq!(
            err("-a.com:80"),
            r#""-a.com:80": label "-a" of the host name starts or ends with '-', which DNS labels cannot"#
        );
        assert!(err("a-.com:80").contains("starts or ends with '-'"));
        let label = "a".repeat(64);
        assert_eq!(
            err(&format!("{label}.com:80")),
            format!(
                "\"{label}.com:80\": label \"{label}\" of the host name is 64 bytes long; the limit is 63"
            )
        );
        let long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63),
        ]
        .join(".");
        assert_eq!(
            err(&format!("{long}:80")),
            format!("\"{long}:80\": the host name is 255 bytes long; the limit is 253")
        );
        assert_eq!(ok(&format!("{}:80", &long[..253])).port, 80);
    }

    #[test]
    fn error_listen_host_name() {
        assert_eq!(
            listen_err("example.com:80"),
            r#""example.com:80": listen addresses must be IP literals, not host names; write e.g. "127.0.0.1:80" or "[::]:80""#
        );
        assert_eq!(
            listen_err("localhost:80"),
            r#""localhost:80": listen addresses must be IP literals, not host names; write e.g. "127.0.0.1:80" or "[::1]:80""#
        );
        assert_eq!(
            listen_err("[::1]:70000"),
            r#""[::1]:70000": port 70000 is out of range; use 1 to 65535"#
        );
    }

    #[test]
    fn interface_lookup() {
        assert!(interface_exists("lo"));
        assert!(!interface_exists("nosuchif0"));
        assert!(!interface_exists(""));
        assert_eq!(interface_name(lo_index()).as_deref(), Some("lo"));
        assert_eq!(interface_name(u32::MAX), None);
        assert_eq!(
            interface_index("nosuchif0").unwrap_err().0,
            r#"interface "nosuchif0" does not exist (ip link shows the interfaces)"#
        );
        assert_eq!(
            interface_index("").unwrap_err().0,
            r#"the interface name is empty; name an interface, e.g. "eth0" (ip link lists them)"#
        );
        assert_eq!(
            interface_index("a b").unwrap_err().0,
            r#"interface name "a b" contains ' ', which Linux interface names cannot contain (ip link lists the interfaces)"#
        );
        assert_eq!(
            interface_index("a\0b").unwrap_err().0,
            r#"interface name "a\0b" contains '\0', which Linux interface names cannot contain (ip link lists the interfaces)"#
        );
    }

    #[tokio::test]
    async fn resolves_ip_literals() {
        assert_eq!(
            ok("10.0.0.1:80").resolve().await.unwrap(),
            vec!["10.0.0.1:80".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            ok("[2001:db8::1]:80").resolve().await.unwrap(),
            vec!["[2001:db8::1]:80".parse::<SocketAddr>().unwrap()]
        );
    }

    #[tokio::test]
    async fn resolves_zone_name_to_current_index() {
        let addrs = ok("[fe80::1%lo]:2368").resolve().await.unwrap();
        let expected = SocketAddrV6::new("fe80::1".parse().unwrap(), 2368, 0, lo_index());
        assert_eq!(addrs, vec![SocketAddr::V6(expected)]);
    }

    #[tokio::test]
    async fn resolves_zone_index() {
        let e = ok(&format!("[fe80::1%{}]:2368", lo_index()));
        let addrs = e.resolve().await.unwrap();
        let expected = SocketAddrV6::new("fe80::1".parse().unwrap(), 2368, 0, lo_index());
        assert_eq!(addrs, vec![SocketAddr::V6(expected)]);
    }

    #[tokio::test]
    async fn resolve_error_unknown_zone_name() {
        let e = ok("[fe80::1%nosuchif0]:2368").resolve().await.unwrap_err();
        assert_eq!(
            e.0,
            r#"cannot use "[fe80::1%nosuchif0]:2368": interface "nosuchif0" does not exist (ip link shows the interfaces)"#
        );
    }

    #[tokio::test]
    async fn resolve_error_unknown_zone_index() {
        let e = ok("[fe80::1%4000000000]:2368").resolve().await.unwrap_err();
        assert_eq!(
            e.0,
            r#"cannot use "[fe80::1%4000000000]:2368": there is no interface with index 4000000000 (ip link lists the interfaces with their indexes); prefer the interface's name, e.g. "%eth0""#
        );
    }

    #[tokio::test]
    async fn resolves_localhost_from_hosts_file() {
        let addrs = ok("localhost:8080").resolve().await.unwrap();
        assert!(!addrs.is_empty());
        assert!(addrs
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 8080));
    }

    #[test]
    fn lookup_error_messages() {
        let io = std::io::Error::other("Name or service not known");
        assert_eq!(
            lookup_failed("nosuch.invalid", &io).0,
            r#"cannot resolve host name "nosuch.invalid": Name or service not known; check the name, /etc/hosts and the DNS servers, or use an IP address"#
        );
        assert_eq!(
            lookup_empty("empty.example").0,
            r#"host name "empty.example" resolved to no address; check its DNS records or use an IP address"#
        );
    }
}
