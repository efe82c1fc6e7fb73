use std::time::Duration;

use crate::config::{
    tests::{errors, load},
    Mode,
};
use crate::peek::{NamePattern, Protocol};
use crate::proxy_header::Version;

const ISSUE_EXAMPLE: &str = r#"[[route]]
name = "web"
listen = "[::]:443"
upstream = "[::1]:443"
peek_timeout = "2s"
proxy_protocol = "v2"

[[route.match]]
sni = ["Blog.Example.com.", "*.example.org"]
upstream = "[::1]:444"

[[route.match]]
sni = ["git.example.com"]
alpn = ["h2", "http/1.1"]
upstream = "git.lxd:443"
mode = "copy"
proxy_protocol = "v1"

[[route.match]]
host = ["blog.example.com"]
upstream = "[::1]:2368"

[[route.match]]
protocol = "other"
upstream = "[::1]:22"
connect_timeout = "1s"
"#;

#[test]
fn the_issue_example_loads_in_order() {
    let config = load(ISSUE_EXAMPLE);
    let route = &config.routes[0];
    assert_eq!(route.peek_timeout, Duration::from_secs(2));
    assert_eq!(route.matches.len(), 4);
    let m = &route.matches;
    assert_eq!(
        m[0].rule.sni,
        [
            NamePattern::Exact("blog.example.com".into()),
            NamePattern::Suffix("example.org".into())
        ]
    );
    assert_eq!(m[1].rule.alpn, ["h2", "http/1.1"]);
    assert_eq!(
        m[2].rule.host,
        [NamePattern::Exact("blog.example.com".into())]
    );
    assert_eq!(m[3].rule.protocol, Some(Protocol::Other));
    let git = route.target(Some(1)).unwrap();
    assert_eq!(
        (git.mode, git.proxy_protocol),
        (Mode::Copy, Some(Version::V1))
    );
    let other = route.target(Some(3)).unwrap();
    assert_eq!(
        (other.connect_timeout, other.proxy_protocol),
        (Duration::from_secs(1), Some(Version::V2))
    );
    assert_eq!(
        route.target(None).unwrap().upstream.to_string(),
        "[::1]:443"
    );
    let listed = crate::config::describe_route(route);
    assert!(
        listed.contains("  match[0] sni=blog.example.com,*.example.org -> [::1]:444 (PROXY v2)\n"),
        "{listed}"
    );
    assert!(
        listed.contains(
            "  match[1] sni=git.example.com alpn=h2,http/1.1 -> git.lxd:443 (mode copy) (PROXY v1)"
        ),
        "{listed}"
    );
}

#[test]
fn a_route_with_matches_needs_no_default() {
    let config = load("[[route]]\nname = \"a\"\nlisten = \"[::]:443\"\n[[route.match]]\nsni = [\"a.example\"]\nupstream = \"[::1]:1\"\n");
    assert!(!config.routes[0].has_default());
    assert!(config.routes[0].target(None).is_none());
    assert_eq!(
        config.routes[0]
            .target(Some(0))
            .unwrap()
            .upstream
            .to_string(),
        "[::1]:1"
    );
    let e = errors("[[route]]\nname = \"a\"\nlisten = \"[::]:443\"\n");
    assert!(e[0].contains("route[0].upstream: missing"), "{e:?}");
}

#[test]
fn bad_matches_name_the_element() {
    let text = "[[route]]\nname = \"a\"\nlisten = \"[::]:443\"\n\n[[route.match]]\nsni = [\"ok.example\", \"192.0.2.7\"]\nupstream = \"[::1]:1\"\n";
    let e = errors(text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with(
            "spliced.toml:6:22: route[0].match[0].sni: \"192.0.2.7\": 192.0.2.7 is an IP address"
        ),
        "{e:?}"
    );
    let cases = [
        (
            "host = [\"a b.example\"]\nupstream = \"[::1]:1\"",
            "route[0].match[0].host",
        ),
        (
            "sni = [\"*\"]\nupstream = \"[::1]:1\"",
            "route[0].match[0].sni",
        ),
        (
            "protocol = \"ssh\"\nupstream = \"[::1]:1\"",
            "is not a protocol",
        ),
        ("alpn = []\nupstream = \"[::1]:1\"", "the list is empty"),
        (
            "sni = [\"a.example\"]\nhost = [\"a.example\"]\nupstream = \"[::1]:1\"",
            "never hold together",
        ),
        (
            "sni = [\"a.example\"]",
            "route[0].match[0].upstream: missing",
        ),
        ("upstream = \"[::1]:1\"", "needs at least one of"),
        (
            "sni = [\"a.example\"]\nupstream = \"[::1]:1\"\nsnii = 1",
            "did you mean `sni`?",
        ),
        (
            "sni = [\"a.example\"]\nupstream = \"[::1]:1\"\nproxy_protocol = \"v3\"",
            "use \"v1\" or \"v2\"",
        ),
    ];
    for (body, want) in cases {
        let text =
            format!("[[route]]\nname = \"a\"\nlisten = \"[::]:443\"\n[[route.match]]\n{body}\n");
        let e = errors(&text);
        assert!(e.iter().any(|e| e.contains(want)), "{body}: {e:?}");
    }
    let e = errors("[[route]]\nname = \"a\"\nlisten = \"[::]:443\"\nupstream = \"[::1]:1\"\npeek_timeout = \"0s\"\n");
    assert!(e[0].contains("route[0].peek_timeout"), "{e:?}");
}
