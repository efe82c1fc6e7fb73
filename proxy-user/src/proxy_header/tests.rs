use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::*;

fn origin(source: &str, destination: &str) -> Origin {
    Origin {
        source: source.parse().unwrap(),
        destination: destination.parse().unwrap(),
    }
}

#[test]
fn v1_round_trip_in_the_clients_family() {
    let o = origin("[::ffff:198.51.100.7]:40000", "[::ffff:203.0.113.1]:443");
    let header = encode(Version::V1, o, Seen::default());
    assert_eq!(header, b"PROXY TCP4 198.51.100.7 203.0.113.1 40000 443\r\n");
    let want = origin("198.51.100.7:40000", "203.0.113.1:443");
    assert_eq!(
        parse(&header),
        Progress::Done(Parsed::Proxied(want), header.len())
    );
    let o6 = origin("[2001:db8::7]:40000", "[2001:db8::1]:443");
    let header = encode(Version::V1, o6, Seen::default());
    assert_eq!(header, b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n");
}

#[test]
fn v2_carries_authority_and_alpn() {
    let o = origin("198.51.100.7:40000", "203.0.113.1:443");
    let seen = Seen {
        authority: Some("blog.example.com"),
        alpn: Some("h2"),
    };
    let header = encode(Version::V2, o, seen);
    assert_eq!(&header[..12], ppp::v2::PROTOCOL_PREFIX);
    assert_eq!(
        parse(&header),
        Progress::Done(Parsed::Proxied(o), header.len())
    );
    let parsed = ppp::v2::Header::try_from(&header[..]).unwrap();
    let tlvs: Vec<(u8, Vec<u8>)> = parsed
        .tlvs()
        .map(|t| t.unwrap())
        .map(|t| (t.kind, t.value.to_vec()))
        .collect();
    assert_eq!(
        tlvs,
        [(2, b"blog.example.com".to_vec()), (1, b"h2".to_vec())]
    );
}

#[test]
fn every_prefix_needs_more_and_bytes_after_are_kept() {
    let o = origin("[2001:db8::7]:1", "[2001:db8::1]:2");
    for version in [Version::V1, Version::V2] {
        let header = encode(
            version,
            o,
            Seen {
                authority: Some("a.example"),
                alpn: None,
            },
        );
        for n in 0..header.len() {
            assert_eq!(
                parse(&header[..n]),
                Progress::NeedMore,
                "{version} prefix {n}"
            );
        }
        let mut more = header.clone();
        more.extend_from_slice(b"client bytes");
        assert_eq!(
            parse(&more),
            Progress::Done(Parsed::Proxied(o), header.len())
        );
    }
}

#[test]
fn local_unknown_and_broken_headers() {
    assert_eq!(
        parse(b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00"),
        Progress::Done(Parsed::Local, 16)
    );
    assert_eq!(
        parse(b"PROXY UNKNOWN\r\n"),
        Progress::Done(Parsed::Local, 15)
    );
    assert_eq!(
        parse(b"GET / HTTP/1.1\r\n"),
        Progress::Failed(Rejected::Missing)
    );
    assert_eq!(parse(b"\x16\x03\x01"), Progress::Failed(Rejected::Missing));
    assert!(matches!(
        parse(b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\n"),
        Progress::Failed(Rejected::V1(_))
    ));
    let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
    assert_eq!(parse(&long), Progress::Failed(Rejected::V1TooLong));
    // A v2 length of 60,000: refused from the first 16 bytes.
    let big = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xea\x60";
    assert_eq!(parse(big), Progress::Failed(Rejected::V2TooLong(60_000)));
    // Version 3, an IPv4 block too short for its addresses.
    assert!(matches!(
        parse(b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c"),
        Progress::Failed(Rejected::V2(_))
    ));
    let short = [&b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x04"[..], &[0; 4]].concat();
    assert!(matches!(parse(&short), Progress::Failed(Rejected::V2(_))));
    // A TLV running past the end.
    let tlv = [
        &b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0f"[..],
        &[0; 12],
        &[2, 0, 9],
    ]
    .concat();
    assert!(matches!(parse(&tlv), Progress::Failed(Rejected::V2(_))));
}

#[tokio::test(start_paused = true)]
async fn read_header_outcomes() {
    let o = origin("198.51.100.7:40000", "203.0.113.1:443");
    let header = encode(Version::V2, o, Seen::default());
    let (mut front, mut spliced) = tokio::io::duplex(1024);
    // Split over writes, with client bytes in the last one.
    front.write_all(&header[..5]).await.unwrap();
    let rest = [&header[5..], b"hello"].concat();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        front.write_all(&rest).await.unwrap();
        front
    });
    let (parsed, after) = read_header(&mut spliced, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(parsed, Parsed::Proxied(o));
    assert_eq!(after, b"hello");
    let mut front = writer.await.unwrap();
    assert_eq!(
        read_header(&mut spliced, Duration::from_secs(3)).await,
        Err(Rejected::Timeout(Duration::from_secs(3)))
    );
    front.write_all(&header[..20]).await.unwrap();
    drop(front);
    assert_eq!(
        read_header(&mut spliced, Duration::from_secs(3)).await,
        Err(Rejected::Truncated(20))
    );
}

#[test]
fn every_rejection_has_its_counter() {
    use super::Outcome;
    let cases = [
        (Rejected::Missing, Outcome::Missing),
        (Rejected::V1TooLong, Outcome::TooLong),
        (Rejected::V2TooLong(5000), Outcome::TooLong),
        (Rejected::V1("x".into()), Outcome::Malformed),
        (Rejected::V2("x".into()), Outcome::Malformed),
        (Rejected::Truncated(3), Outcome::Truncated),
        (Rejected::Timeout(Duration::from_secs(1)), Outcome::Timeout),
        (Rejected::Read("reset".into()), Outcome::ReadError),
    ];
    for (rejected, outcome) in cases {
        assert_eq!(rejected.outcome(), outcome, "{rejected}");
    }
    for (i, o) in Outcome::ALL.iter().enumerate() {
        assert_eq!(o.index(), i);
    }
    let labels: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
    assert_eq!(
        labels,
        [
            "proxied",
            "local",
            "missing",
            "too_long",
            "malformed",
            "truncated",
            "timeout",
            "read_error"
        ]
    );
}
