use super::*;
use crate::forward::DataPath;

#[test]
fn lanes_line_only_with_lanes() {
    assert_eq!(
        render_lanes(&[3, 0], &[120, 118]),
        "accepting on 2 lanes: live 3 0, steered 120 118\n"
    );
    assert_eq!(render_lanes(&[1], &[5]), "");
    assert_eq!(render_lanes(&[], &[]), "");
}

#[test]
fn refusals_only_for_routes_with_rules() {
    use crate::xdp::{AttachMode, Refusals, SourceRules};
    let rules = SourceRules {
        syn_rate: Some(5),
        ..SourceRules::default()
    };
    let counts = [
        Refusals { xdp: 6, accept: 1 },
        Refusals { xdp: 0, accept: 2 },
    ];
    let text = render_refusals(
        &[("eth0".into(), AttachMode::Native)],
        &[
            ("admin".into(), rules, counts),
            ("web".into(), SourceRules::default(), Default::default()),
        ],
    );
    assert_eq!(
        text,
        "XDP front on eth0 (native)\n\
         route admin refused: acl 7 (xdp 6, accept 1), syn_rate 2 (xdp 0, accept 2)\n"
    );
    assert_eq!(render_refusals(&[], &[]), "");
}

#[test]
fn table_is_aligned() {
    let samples = [
        Sample {
            route: "web".into(),
            client: "127.0.0.1:50000".parse().unwrap(),
            via: Some("[2001:db8::7]:4000".parse().unwrap()),
            upstream: Some("[fe80::2%7]:80".parse().unwrap()),
            path: Some(DataPath::Sockmap),
            bytes_up: 12,
            bytes_down: 3456789,
            age: Duration::from_millis(12_340),
            idle: Duration::from_millis(100),
            routing: Some("rule=match[0] peek=matched sni=a.example.com".into()),
        },
        Sample {
            route: "a-much-longer-name".into(),
            client: "[::1]:1".parse().unwrap(),
            via: None,
            upstream: None,
            path: None,
            bytes_up: 0,
            bytes_down: 0,
            age: Duration::ZERO,
            idle: Duration::ZERO,
            routing: None,
        },
    ];
    let text = render(&samples);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "2 live connection(s)");
    assert!(lines[1].starts_with("ROUTE               CLIENT"), "{text}");
    let fields: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        fields,
        [
            "web",
            "127.0.0.1:50000",
            "[fe80::2%7]:80",
            "sockmap",
            "12",
            "3456789",
            "12.3s",
            "0.1s",
            "rule=match[0],peek=matched,sni=a.example.com",
            "[2001:db8::7]:4000"
        ]
    );
    assert!(lines[3].contains("(dialing)"), "{text}");
    // Every column starts at the same offset on every line.
    let col = lines[1].find("UPSTREAM").unwrap();
    assert_eq!(lines[2].find("[fe80").unwrap(), col);
    assert_eq!(
        render(&[]),
        "0 live connection(s)\nROUTE  CLIENT  UPSTREAM  PATH  BYTES_UP  BYTES_DOWN  AGE  IDLE  ROUTING  VIA\n"
    );
}

#[test]
fn query_names_the_path_and_the_fix() {
    let e = query(Path::new("/nonexistent/spliced/control.sock"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("cannot reach spliced at /nonexistent/spliced/control.sock: "),
        "{e}"
    );
    assert!(e.contains("is spliced running?"), "{e}");
}
