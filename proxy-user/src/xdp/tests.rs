use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use proxy_common::{XDP_ROUTE_HAS_ALLOW, XDP_ROUTE_HAS_DENY};

use super::*;

fn p(s: &str) -> Prefix {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn prefixes_parse_and_refuse_with_the_fix() {
    assert_eq!(p("198.51.100.0/24").len, 24);
    assert_eq!(p("2001:db8:1::/48").to_string(), "2001:db8:1::/48");
    assert_eq!(p("198.51.100.66").to_string(), "198.51.100.66/32");
    assert_eq!(p("0.0.0.0/0").len, 0);
    assert_eq!(p("::/0").len, 0);
    let e = "198.51.100.1/24".parse::<Prefix>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "198.51.100.1/24 has bits set below the /24 prefix: write 198.51.100.0/24"
    );
    let e = "198.51.100.0/33".parse::<Prefix>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "/33 is longer than an IPv4 address (32 bits)"
    );
    let e = "2001:db8::/129".parse::<Prefix>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "/129 is longer than an IPv6 address (128 bits)"
    );
    let e = "::ffff:198.51.100.0/120".parse::<Prefix>().unwrap_err();
    assert!(
        e.to_string().contains("write it as IPv4 (198.51.100.0/24)"),
        "{e}"
    );
    for bad in [
        "",
        "198.51.100.0/",
        "198.51.100.0/x",
        "host/24",
        "198.51.100.0/+4",
        "1.2.3.4/024x",
    ] {
        assert!(bad.parse::<Prefix>().is_err(), "{bad:?} accepted");
    }
}

#[test]
fn deny_wins_and_families_stay_apart() {
    let rules = SourceRules {
        allow: Some(vec![p("198.51.100.0/24"), p("2001:db8:1::/48")]),
        deny: vec![p("198.51.100.66/32")],
        syn_rate: None,
    };
    assert_eq!(rules.admits(ip("198.51.100.7")), Ok(()));
    assert_eq!(rules.admits(ip("::ffff:198.51.100.7")), Ok(()));
    assert_eq!(rules.admits(ip("198.51.100.66")), Err(Reason::Acl));
    assert_eq!(rules.admits(ip("203.0.113.1")), Err(Reason::Acl));
    assert_eq!(rules.admits(ip("2001:db8:1:ff::1")), Ok(()));
    assert_eq!(rules.admits(ip("2001:db8:2::1")), Err(Reason::Acl));
    let v6_all = SourceRules {
        allow: Some(vec![p("::/0")]),
        ..SourceRules::default()
    };
    assert_eq!(v6_all.admits(ip("203.0.113.1")), Err(Reason::Acl));
    assert_eq!(SourceRules::default().admits(ip("203.0.113.1")), Ok(()));
}

#[test]
fn trie_keys_put_route_and_family_first() {
    let (len, data) = p("198.51.100.0/24").trie_key(7);
    assert_eq!(len, 64 + 24);
    assert_eq!(&data[..8], &[0, 0, 0, 7, 4, 0, 0, 0]);
    assert_eq!(&data[8..12], &[198, 51, 100, 0]);
    assert!(data[12..].iter().all(|b| *b == 0));
    let (len, data) = p("2001:db8::/32").trie_key(1);
    assert_eq!(len, 64 + 32);
    assert_eq!(data[4], 6);
    assert_eq!(&data[8..12], &[0x20, 0x01, 0x0d, 0xb8]);
}

fn route(name: &str, listen: &[&str], rules: SourceRules) -> RouteRules {
    RouteRules {
        name: name.into(),
        listen: listen
            .iter()
            .map(|a| a.parse::<SocketAddr>().unwrap())
            .collect(),
        rules,
    }
}

#[test]
fn compile_wildcards_and_flags() {
    let mut ids = RouteIds::default();
    let routes = [
        route(
            "admin",
            &["[::]:8443"],
            SourceRules {
                allow: Some(vec![p("198.51.100.0/24")]),
                deny: vec![p("198.51.100.66/32")],
                syn_rate: Some(20),
            },
        ),
        route("web", &["203.0.113.5:80"], SourceRules::default()),
    ];
    ids.assign(routes.iter().map(|r| r.name.as_str())).unwrap();
    let plan = MapPlan::compile(&routes, &ids);
    let admin = ids.get("admin").unwrap();
    let v6 = plan.routes[&route_key(ip("::"), 8443)];
    let v4 = plan.routes[&route_key(ip("0.0.0.0"), 8443)];
    assert_eq!(v6, v4);
    assert_eq!(v6.id, admin);
    assert_eq!(v6.flags, XDP_ROUTE_HAS_ALLOW | XDP_ROUTE_HAS_DENY);
    assert_eq!(v6.syn_rate, 20);
    let web = plan.routes[&route_key(ip("203.0.113.5"), 80)];
    assert_eq!((web.flags, web.syn_rate), (0, 0));
    assert_eq!(plan.routes.len(), 3);
    assert_eq!(plan.allow.len(), 1);
    assert_eq!(plan.deny.len(), 1);
    // IPv4 keys are IPv4-mapped.
    let key = route_key(ip("203.0.113.5"), 80);
    assert_eq!(&key.addr[10..], &[0xff, 0xff, 203, 0, 113, 5]);
}

#[test]
fn reload_inserts_before_it_removes() {
    let mut ids = RouteIds::default();
    let old = [route(
        "a",
        &["198.51.100.1:80"],
        SourceRules {
            allow: Some(vec![p("203.0.113.0/24")]),
            ..SourceRules::default()
        },
    )];
    ids.assign(["a"]).unwrap();
    let before = MapPlan::compile(&old, &ids);
    let new = [route(
        "a",
        &["198.51.100.1:80"],
        SourceRules {
            deny: vec![p("203.0.113.9/32")],
            ..SourceRules::default()
        },
    )];
    let after = MapPlan::compile(&new, &ids);
    let ops = before.changes_to(&after);
    let pos = |f: &dyn Fn(&MapOp) -> bool| ops.iter().position(f).unwrap();
    let insert_deny = pos(&|o| matches!(o, MapOp::InsertDeny(_)));
    let set_route = pos(&|o| matches!(o, MapOp::SetRoute(..)));
    let remove_allow = pos(&|o| matches!(o, MapOp::RemoveAllow(_)));
    assert!(
        insert_deny < set_route && set_route < remove_allow,
        "{ops:?}"
    );
    assert_eq!(ops.len(), 3);
    assert!(after.changes_to(&after).is_empty());
    // Everything removed: routes go before their prefixes.
    let ops = after.changes_to(&MapPlan::default());
    assert!(matches!(ops[0], MapOp::RemoveRoute(_)), "{ops:?}");
    assert!(matches!(ops[1], MapOp::RemoveDeny(_)), "{ops:?}");
}

#[test]
fn route_ids_are_stable_and_freed_ids_wait() {
    let mut ids = RouteIds::default();
    ids.assign(["a", "b", "c"]).unwrap();
    let (a, b, c) = (ids.get("a"), ids.get("b"), ids.get("c"));
    let fresh = ids.assign(["a", "c", "d"]).unwrap();
    assert_eq!((ids.get("a"), ids.get("c")), (a, c));
    assert_eq!(ids.get("b"), None);
    assert_eq!(fresh.len(), 1);
    assert_ne!(
        ids.get("d"),
        b,
        "a freed id is not reused in the same update"
    );
}

#[test]
fn accept_guard_acl_and_bucket() {
    let guard = AcceptGuard::new(SourceRules {
        allow: None,
        deny: vec![p("198.51.100.66/32")],
        syn_rate: Some(5),
    });
    let t = Duration::from_secs(100);
    assert_eq!(guard.check_at(ip("198.51.100.66"), t), Err(Reason::Acl));
    // Burst: twice the rate, then nothing until tokens come back.
    for i in 0..10 {
        assert_eq!(guard.check_at(ip("198.51.100.7"), t), Ok(()), "SYN {i}");
    }
    assert_eq!(guard.check_at(ip("198.51.100.7"), t), Err(Reason::SynRate));
    // Another source has its own bucket; an IPv6 /64 shares one.
    assert_eq!(guard.check_at(ip("198.51.100.8"), t), Ok(()));
    for _ in 0..10 {
        guard.check_at(ip("2001:db8::1"), t).unwrap();
    }
    assert_eq!(guard.check_at(ip("2001:db8::2"), t), Err(Reason::SynRate));
    assert_eq!(guard.check_at(ip("2001:db8:0:1::2"), t), Ok(()));
    // 200 ms later: one more token (5/s).
    let later = t + Duration::from_millis(200);
    assert_eq!(guard.check_at(ip("198.51.100.7"), later), Ok(()));
    assert_eq!(
        guard.check_at(ip("198.51.100.7"), later),
        Err(Reason::SynRate)
    );
    assert_eq!(guard.refused(Reason::Acl), 1);
    assert_eq!(guard.refused(Reason::SynRate), 3);
}

#[test]
fn log_limiter_speaks_once_per_interval() {
    let limiter = LogLimiter::new(Duration::from_secs(10));
    let t0 = std::time::Instant::now();
    assert_eq!(limiter.add(1, t0), Some(1));
    assert_eq!(limiter.add(5, t0 + Duration::from_secs(1)), None);
    assert_eq!(limiter.add(0, t0 + Duration::from_secs(9)), None);
    assert_eq!(limiter.add(2, t0 + Duration::from_secs(10)), Some(7));
    assert_eq!(limiter.add(0, t0 + Duration::from_secs(30)), None);
}

#[test]
fn describe_lists_effective_rules() {
    let rules = SourceRules {
        allow: Some(vec![p("198.51.100.0/24")]),
        deny: vec![p("198.51.100.66/32")],
        syn_rate: Some(20),
    };
    assert_eq!(
        rules.describe(),
        [
            "deny 198.51.100.66/32",
            "allow only 198.51.100.0/24",
            "syn_rate 20/s per source (IPv4 /32, IPv6 /64), bursts up to 40",
        ]
    );
    assert!(SourceRules::default().describe().is_empty());
}

#[test]
fn config_values() {
    use super::config::*;
    assert_eq!(
        parse_interfaces(&["eth0", "lxdbr0"]).unwrap(),
        ["eth0", "lxdbr0"]
    );
    assert!(parse_interfaces(&[]).unwrap().is_empty());
    let e = parse_interfaces(&["eth0", "eth*"]).unwrap_err();
    assert_eq!(e.index, Some(1));
    assert!(e.message.contains("fixed, not patterns"), "{e:?}");
    assert_eq!(parse_interfaces(&["a", "a"]).unwrap_err().index, Some(1));
    assert_eq!(parse_interfaces(&["a/b"]).unwrap_err().index, Some(0));
    assert_eq!(
        parse_interfaces(&["0123456789abcdef"]).unwrap_err().index,
        Some(0)
    );
    assert_eq!(parse_interfaces(&[""]).unwrap_err().index, Some(0));
    let allow = parse_prefixes(&["198.51.100.0/24", "2001:db8:1::/48"], "allow").unwrap();
    assert_eq!(allow.len(), 2);
    let e = parse_prefixes(&[], "allow").unwrap_err();
    assert_eq!(e.index, None);
    assert!(e.message.contains("empty allow list"), "{e:?}");
    assert!(parse_prefixes(&[], "deny").unwrap().is_empty());
    let e = parse_prefixes(&["198.51.100.0/24", "198.51.100.1/24"], "deny").unwrap_err();
    assert_eq!(e.index, Some(1));
    assert!(e.message.contains("write 198.51.100.0/24"), "{e:?}");
    let e = parse_prefixes(&["10.0.0.0/8", "10.0.0.0/8"], "deny").unwrap_err();
    assert!(e.message.contains("twice"), "{e:?}");
    assert_eq!(parse_syn_rate(20), Ok(20));
    assert!(parse_syn_rate(0)
        .unwrap_err()
        .to_string()
        .contains("out of range"));
    assert!(parse_syn_rate(1_000_001).is_err());
}

#[test]
fn xdp_mode_key() {
    use super::config::XdpModeChoice;
    let load = |top: &str| {
        crate::config::Config::from_toml(
            std::path::Path::new("spliced.toml"),
            &format!(
                "{top}\n[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n\
                 upstream = \"10.0.0.2:80\"\n"
            ),
        )
        .map_err(|e| e.iter().map(|e| e.to_string()).collect::<Vec<_>>())
    };
    assert_eq!(load("").unwrap().xdp_mode, XdpModeChoice::Auto);
    assert_eq!(
        load("xdp_mode = \"generic\"").unwrap().xdp_mode,
        XdpModeChoice::Generic
    );
    assert_eq!(
        load("xdp_mode = \"auto\"").unwrap().xdp_mode,
        XdpModeChoice::Auto
    );
    let e = load("xdp_mode = \"native\"").unwrap_err();
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with(
            "spliced.toml:1:12: xdp_mode: \"native\" is not an XDP mode; use \"auto\""
        ),
        "{e:?}"
    );
    let e = load("xdp_mode = 1").unwrap_err();
    assert!(e[0].contains("write e.g. xdp_mode = \"generic\""), "{e:?}");
}

#[test]
fn filters_without_xdp_check_at_accept_and_keep_counters_across_reloads() {
    let routes = |deny: &str| {
        vec![route(
            "a",
            &["127.0.0.1:8080"],
            SourceRules {
                deny: vec![p(deny)],
                ..SourceRules::default()
            },
        )]
    };
    let filters = Filters::start(
        &[],
        &[],
        config::XdpModeChoice::Auto,
        &routes("198.51.100.66/32"),
    )
    .unwrap();
    assert!(filters.interfaces().is_empty());
    assert_eq!(filters.check("a", ip("198.51.100.66")), Err(Reason::Acl));
    assert_eq!(filters.check("a", ip("198.51.100.7")), Ok(()));
    assert_eq!(filters.check("unknown", ip("198.51.100.66")), Ok(()));
    filters
        .apply(
            &[],
            &[],
            config::XdpModeChoice::Auto,
            &routes("198.51.100.7/32"),
        )
        .unwrap();
    assert_eq!(filters.check("a", ip("198.51.100.66")), Ok(()));
    assert_eq!(filters.check("a", ip("198.51.100.7")), Err(Reason::Acl));
    let r = filters.refusals("a", Reason::Acl);
    assert_eq!((r.xdp, r.accept), (0, 2));
    filters
        .apply(&[], &[], config::XdpModeChoice::Auto, &[])
        .unwrap();
    assert_eq!(filters.refusals("a", Reason::Acl), Refusals::default());
    // Interfaces without an object: a clear error, nothing changed.
    let e = filters
        .apply(&[], &["lo".into()], config::XdpModeChoice::Auto, &[])
        .err()
        .unwrap();
    assert!(e.to_string().contains("without its XDP object"), "{e}");
}
