use super::*;
use std::net::Ipv4Addr;

fn ok(s: &str) -> Endpoint {
    s.parse()
        .unwrap_or_else(|e: AddrError| panic!("{s:?} should parse: {e}"))
}

fn err(s: &str) -> String {
    match s.parse::<Endpoint>() {
        Ok(e) => panic!("{s:?} should fail, parsed as {e:?}"),
        Err(e) => e.to_string(),
    }
}

fn listen_err(s: &str) -> String {
    match Endpoint::parse_listen(s) {
        Ok(e) => panic!("{s:?} should fail, parsed as {e:?}"),
        Err(e) => e.to_string(),
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
        interface_index("nosuchif0").unwrap_err().to_string(),
        r#"interface "nosuchif0" does not exist (ip link shows the interfaces)"#
    );
    assert_eq!(
        interface_index("").unwrap_err().to_string(),
        r#"the interface name is empty; name an interface, e.g. "eth0" (ip link lists them)"#
    );
    assert_eq!(
        interface_index("a b").unwrap_err().to_string(),
        r#"interface name "a b" contains ' ', which Linux interface names cannot contain (ip link lists the interfaces)"#
    );
    assert_eq!(
        interface_index("a\0b").unwrap_err().to_string(),
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
        e.to_string(),
        r#"cannot use "[fe80::1%nosuchif0]:2368": interface "nosuchif0" does not exist (ip link shows the interfaces)"#
    );
}

#[tokio::test]
async fn resolve_error_unknown_zone_index() {
    let e = ok("[fe80::1%4000000000]:2368").resolve().await.unwrap_err();
    assert_eq!(
        e.to_string(),
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
        AddrError::Lookup {
            name: "nosuch.invalid".into(),
            source: io
        }
        .to_string(),
        r#"cannot resolve host name "nosuch.invalid": Name or service not known; check the name, /etc/hosts and the DNS servers, or use an IP address"#
    );
    assert_eq!(
        AddrError::NoAddress {
            name: "empty.example".into()
        }
        .to_string(),
        r#"host name "empty.example" resolved to no address; check its DNS records or use an IP address"#
    );
}
