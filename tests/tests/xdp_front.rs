//! The XDP front on the real kernel: two namespaces joined by a veth, the program attached to
//! the server's end, real SYNs (from connect(2), a raw socket or AF_PACKET) from allowed and
//! denied sources. Root; in CI (or `cargo xtask test`) these fail instead of skipping.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use spliced::xdp::{AttachMode, ProgramKind, Reason, RouteRules, SourceRules, XdpError, XdpFront};
use tests::xdp_net::*;

fn rules(allow: &[&str], deny: &[&str], syn_rate: Option<u32>) -> SourceRules {
    let parse = |l: &[&str]| {
        l.iter()
            .map(|p| p.parse().expect("prefix"))
            .collect::<Vec<_>>()
    };
    SourceRules {
        allow: (!allow.is_empty()).then(|| parse(allow)),
        deny: parse(deny),
        syn_rate,
    }
}

/// A listener on `[::]:0` in the server namespace and the front on its `vs`, with `rules`.
fn serve(net: &Net, generic: bool, rules: SourceRules) -> (XdpFront, TcpListener) {
    serve_kind(net, generic, None, rules)
}

/// As [`serve`], with only the copy `kind` of the program if given (else the daemon's choice).
fn serve_kind(
    net: &Net,
    generic: bool,
    kind: Option<ProgramKind>,
    rules: SourceRules,
) -> (XdpFront, TcpListener) {
    Net::run_in(&net.server, move || {
        let listener = TcpListener::bind("[::]:0").expect("bind");
        let mut front = match kind {
            Some(kind) => XdpFront::load_only(spliced::XDP_OBJECT, kind),
            None => XdpFront::load(spliced::XDP_OBJECT),
        }
        .expect("load the XDP front");
        front.set_generic_only(generic);
        front.set_interfaces(&["vs".into()]).expect("attach to vs");
        let route = RouteRules {
            name: "r".into(),
            listen: vec![listener.local_addr().expect("local addr")],
            rules,
        };
        front.set_routes(&[route]).expect("rule maps");
        (front, listener)
    })
}

/// Accepts and drops connections until the returned flag is set.
fn accept_all(listener: TcpListener) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    listener.set_nonblocking(true).expect("nonblocking");
    thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            if listener.accept().is_err() {
                thread::sleep(Duration::from_millis(2));
            }
        }
    });
    stop
}

fn dest(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port)
}

const SERVER_COUNTERS: [&str; 2] = ["TcpExtListenDrops", "TcpPassiveOpens"];
const CLIENT_SYNS: [&str; 2] = ["TcpActiveOpens", "TcpExtTCPSynRetrans"];

/// The copy of the program [`XdpFront::load`] picks here: `frags` from Linux 5.18 on.
fn expected_kind() -> ProgramKind {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().expect("a kernel release starts x.y"));
    let (major, minor) = (numbers.next().unwrap(), numbers.next().unwrap());
    if (major, minor) >= (5, 18) {
        ProgramKind::Frags
    } else {
        ProgramKind::Plain
    }
}

fn acl(generic: bool, kind: Option<ProgramKind>) {
    if !can_run() {
        return;
    }
    let net = Net::new();
    let r = rules(
        &["198.51.100.0/25", "2001:db8:15::/64"],
        &[DENIED4, DENIED6],
        None,
    );
    let (front, listener) = serve_kind(&net, generic, kind, r);
    assert_eq!(front.kind(), kind.unwrap_or_else(expected_kind));
    let want = if generic {
        AttachMode::Generic
    } else {
        AttachMode::Native
    };
    assert_eq!(front.interfaces().collect::<Vec<_>>(), [("vs", want)]);
    let port = listener.local_addr().unwrap().port();
    let stop = accept_all(listener);
    let client = net.client.clone();
    let ok = Net::run_in(&client, move || {
        [(ALLOWED4, S4), (ALLOWED6, S6)]
            .map(|(src, dst)| connect_from(src, dest(dst, port), Duration::from_secs(3)).map(drop))
    });
    for r in ok {
        r.expect("an allowed source connects");
    }
    let server_before = Net::counters(&net.server, &SERVER_COUNTERS);
    let client_before = Net::counters(&net.client, &CLIENT_SYNS);
    let refused = Net::run_in(&client, move || {
        [(DENIED4, S4), (DENIED6, S6), (OUTSIDE4, S4_OTHER)].map(|(src, dst)| {
            connect_from(src, dest(dst, port), Duration::from_millis(1500)).map(drop)
        })
    });
    for (r, src) in refused.iter().zip([DENIED4, DENIED6, OUTSIDE4]) {
        let e = r.as_ref().expect_err("a denied source must not connect");
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::TimedOut,
            "{src}: no SYN-ACK, so a timeout: {e}"
        );
    }
    let server_after = Net::counters(&net.server, &SERVER_COUNTERS);
    let client_after = Net::counters(&net.client, &CLIENT_SYNS);
    assert_eq!(
        server_before, server_after,
        "{SERVER_COUNTERS:?}: nothing reached the stack"
    );
    let syns: u64 = client_after
        .iter()
        .zip(&client_before)
        .map(|(a, b)| a - b)
        .sum();
    assert!(
        syns >= 6,
        "three connects sent at least two SYNs each: {syns}"
    );
    assert_eq!(
        front.drops("r", Reason::Acl).unwrap(),
        syns,
        "one drop per SYN sent"
    );
    assert_eq!(front.drops("r", Reason::SynRate).unwrap(), 0);
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn acl_native() {
    acl(false, None);
}

#[test]
fn acl_generic() {
    acl(true, None);
}

/// The single-buffer copy, which kernels before 5.18 get, filters the same on this kernel.
#[test]
fn acl_native_single_buffer() {
    acl(false, Some(ProgramKind::Plain));
}

/// The multi-buffer copy where the kernel has it (5.18); before, loading it must fail, which is
/// what makes [`XdpFront::load`] fall back.
#[test]
fn acl_generic_multi_buffer() {
    if !can_run() {
        return;
    }
    if expected_kind() == ProgramKind::Frags {
        acl(true, Some(ProgramKind::Frags));
    } else {
        let e = XdpFront::load_only(spliced::XDP_OBJECT, ProgramKind::Frags)
            .err()
            .expect("no multi-buffer XDP before 5.18");
        assert!(matches!(e, XdpError::Verify(_)), "{e}");
    }
}

/// Reload: the rules change in place, and the program stays attached.
#[test]
fn rules_change_in_place() {
    if !can_run() {
        return;
    }
    let net = Net::new();
    let (mut front, listener) = serve(&net, false, rules(&[], &[DENIED4], None));
    let addr = listener.local_addr().unwrap();
    let port = addr.port();
    let stop = accept_all(listener);
    let try_connect = |net: &Net, src: &'static str| {
        Net::run_in(&net.client, move || {
            connect_from(src, dest(S4, port), Duration::from_millis(1200)).map(drop)
        })
    };
    assert!(try_connect(&net, DENIED4).is_err());
    try_connect(&net, ALLOWED4).expect("not denied");
    let swapped = RouteRules {
        name: "r".into(),
        listen: vec![addr],
        rules: rules(&[], &[ALLOWED4], None),
    };
    front.set_routes(&[swapped]).expect("update");
    try_connect(&net, DENIED4).expect("no longer denied");
    assert!(try_connect(&net, ALLOWED4).is_err(), "denied now");
    let before = front.drops("r", Reason::Acl).unwrap();
    front.set_routes(&[]).expect("no routes");
    try_connect(&net, ALLOWED4).expect("no rules: everything passes");
    assert_eq!(front.interfaces().count(), 1);
    assert!(before >= 2);
    stop.store(true, Ordering::Relaxed);
}

/// Another XDP program on the interface: refused, named, left alone.
#[test]
fn occupied_interface_is_refused() {
    if !can_run() {
        return;
    }
    let net = Net::new();
    let (first, _listener) = serve(&net, false, SourceRules::default());
    let err = Net::run_in(&net.server, || {
        let mut second = XdpFront::load(spliced::XDP_OBJECT).expect("load");
        second.set_interfaces(&["vs".into()]).err()
    })
    .expect("a second program must be refused");
    match &err {
        XdpError::Occupied {
            interface, program, ..
        } => {
            assert_eq!(interface, "vs");
            // The kernel keeps 15 bytes of a name: spliced_xdp or spliced_xdp_fra(gs).
            assert!(program.starts_with("spliced_xdp"), "{program}");
        }
        other => panic!("wrong error: {other}"),
    }
    assert!(
        err.to_string().contains("ip link set dev vs xdp off"),
        "{err}"
    );
    assert_eq!(first.interfaces().count(), 1);
    let missing = Net::run_in(&net.server, || {
        let mut front = XdpFront::load(spliced::XDP_OBJECT).expect("load");
        front.set_interfaces(&["nosuch0".into()]).err()
    });
    assert!(
        matches!(missing, Some(XdpError::UnknownInterface(_))),
        "{missing:?}"
    );
}

/// VLAN (one tag and two), IPv4 options and IPv6 hop-by-hop SYNs are filtered like plain
/// ones; non-first fragments pass (they carry no port), first fragments are filtered.
#[test]
fn vlan_options_hop_by_hop_and_fragments() {
    if !can_run() {
        return;
    }
    let net = Net::new();
    let (front, listener) = serve(&net, false, rules(&[], &[DENIED4, DENIED6], None));
    let port = listener.local_addr().unwrap().port();
    let (smac, cmac) = (Net::mac(&net.server, "vs"), Net::mac(&net.client, "vc"));
    let v4 = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
    let syn4 = |src: &str, options: &[u8], frag: u16| {
        let seg = syn4_segment(v4(src), v4(S4), 40_000, port, 7);
        ipv4(v4(src), v4(S4), options, frag, &seg)
    };
    let syn6 = |src: &str| ipv6_syn(v6(src), v6(S6), 40_001, port, true);
    let (q, ad) = ((0x8100u16, 100u16), (0x88a8u16, 300u16));
    let nop_options = [1u8, 1, 1, 0];
    // Each kind of frame, from a denied source and from an allowed one.
    let kinds = |src4: &str, src6: &str| {
        vec![
            frame(smac, cmac, &[], 0x0800, &syn4(src4, &[], 0)),
            frame(smac, cmac, &[], 0x0800, &syn4(src4, &nop_options, 0)),
            frame(smac, cmac, &[q], 0x0800, &syn4(src4, &[], 0)),
            frame(smac, cmac, &[ad, q], 0x0800, &syn4(src4, &nop_options, 0)),
            frame(smac, cmac, &[], 0x86dd, &syn6(src6)),
            frame(smac, cmac, &[q], 0x86dd, &syn6(src6)),
            frame(smac, cmac, &[ad, q], 0x86dd, &syn6(src6)),
            // A first fragment (more-fragments set, offset 0) carries the TCP header.
            frame(smac, cmac, &[], 0x0800, &syn4(src4, &[], 0x2000)),
        ]
    };
    let denied = kinds(DENIED4, DENIED6);
    let sent = denied.len() as u64;
    let before = Net::counters(&net.server, &["TcpInSegs"]);
    send_frames(&net.client, "vc", denied);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        front.drops("r", Reason::Acl).unwrap(),
        sent,
        "every denied SYN dropped"
    );
    assert_eq!(
        Net::counters(&net.server, &["TcpInSegs"]),
        before,
        "none reached TCP"
    );
    // Allowed ones pass the same parser paths; the untagged ones reach TCP (tagged ones are
    // the kernel's to drop: no VLAN device here).
    send_frames(&net.client, "vc", kinds(ALLOWED4, ALLOWED6));
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        front.drops("r", Reason::Acl).unwrap(),
        sent,
        "no allowed SYN dropped"
    );
    let after = Net::counters(&net.server, &["TcpInSegs"]);
    assert!(
        after[0] >= before[0] + 3,
        "allowed SYNs reach TCP: {before:?} -> {after:?}"
    );
    // Non-first fragments from a denied source pass to reassembly.
    let reasm = Net::counters(&net.server, &["IpReasmReqds", "Ip6ReasmReqds"]);
    let tail4 = ipv4(v4(DENIED4), v4(S4), &[], 1, &[0u8; 16]);
    let mut frag6 = vec![6u8, 0, 0, 8, 0, 0, 0x15, 0x15];
    frag6.extend_from_slice(&[0u8; 16]);
    let tail6 = ipv6(v6(DENIED6), v6(S6), 44, &[&frag6]);
    let tails = vec![
        frame(smac, cmac, &[], 0x0800, &tail4),
        frame(smac, cmac, &[], 0x86dd, &tail6),
    ];
    send_frames(&net.client, "vc", tails);
    thread::sleep(Duration::from_millis(300));
    let after = Net::counters(&net.server, &["IpReasmReqds", "Ip6ReasmReqds"]);
    assert_eq!(
        after,
        [reasm[0] + 1, reasm[1] + 1],
        "both fragments reached reassembly"
    );
    assert_eq!(
        front.drops("r", Reason::Acl).unwrap(),
        sent,
        "fragments are not dropped"
    );
}

/// A bounded SYN flood from one source gets through at about `syn_rate` (plus the burst),
/// while 200 connections from another source in the same seconds all succeed at once.
#[test]
fn syn_flood_is_limited_per_source() {
    if !can_run() {
        return;
    }
    const RATE: u32 = 500;
    const FLOOD: u64 = 20_000;
    let net = Net::new();
    let (front, listener) = serve(&net, false, rules(&[], &[], Some(RATE)));
    let port = listener.local_addr().unwrap().port();
    let stop = accept_all(listener);
    let raw = Net::run_in(&net.client, || raw_tcp4(OUTSIDE4.parse().unwrap()));
    let flood = thread::spawn(move || {
        let dst: SocketAddr = dest(S4_OTHER, 0);
        let start = Instant::now();
        for i in 0..FLOOD {
            // 20,000 SYNs in about 2 s: 100 every 10 ms.
            if i % 100 == 0 {
                let due = start + Duration::from_millis(i / 10);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
            }
            let seg = syn4_segment(
                OUTSIDE4.parse().unwrap(),
                S4_OTHER.parse().unwrap(),
                1024 + (i % 60_000) as u16,
                port,
                i as u32,
            );
            raw.send_to(&seg, &dst.into()).expect("raw send");
        }
        start.elapsed()
    });
    let client = net.client.clone();
    let slowest = Net::run_in(&client, move || {
        let mut slowest = Duration::ZERO;
        for i in 0..200 {
            let t = Instant::now();
            connect_from(ALLOWED4, dest(S4, port), Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("connection {i} from the other source: {e}"));
            slowest = slowest.max(t.elapsed());
            thread::sleep(Duration::from_millis(5));
        }
        slowest
    });
    let elapsed = flood.join().expect("flood thread");
    thread::sleep(Duration::from_millis(100));
    let dropped = front.drops("r", Reason::SynRate).unwrap();
    let passed = FLOOD - dropped;
    let expect = f64::from(RATE) * (2.0 + elapsed.as_secs_f64());
    eprintln!("flood: {FLOOD} SYNs in {elapsed:?}, {passed} passed (about {expect:.0} expected), slowest other connect {slowest:?}");
    assert!(
        (passed as f64) > expect * 0.7 && (passed as f64) < expect * 1.3,
        "{passed} SYNs passed, expected about {expect:.0}"
    );
    assert!(
        slowest < Duration::from_millis(900),
        "a connection waited for a SYN retransmit: {slowest:?}"
    );
    assert_eq!(front.drops("r", Reason::Acl).unwrap(), 0);
    stop.store(true, Ordering::Relaxed);
}
