use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::*;

const OPENSSL_PLAIN: &[u8] = include_bytes!("testdata/openssl-plain.bin");
const OPENSSL_LARGE: &[u8] = include_bytes!("testdata/openssl-large.bin");
const CURL: &[u8] = include_bytes!("testdata/curl.bin");
const CURL_HTTP: &[u8] = include_bytes!("testdata/curl-http.bin");

/// A ClientHello handshake message with these extensions (type, body).
fn client_hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut ext = Vec::new();
    for (kind, body) in extensions {
        ext.extend_from_slice(&kind.to_be_bytes());
        ext.extend_from_slice(&(body.len() as u16).to_be_bytes());
        ext.extend_from_slice(body);
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut message = vec![1];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend_from_slice(&body);
    message
}

fn sni_extension(name: &[u8]) -> (u16, Vec<u8>) {
    let mut list = vec![0];
    list.extend_from_slice(&(name.len() as u16).to_be_bytes());
    list.extend_from_slice(name);
    let mut body = (list.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(&list);
    (0, body)
}

/// The handshake message in TLS records of at most `size` bytes each.
fn records(message: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in message.chunks(size) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// The handshake message inside a capture's records.
fn message_of(capture: &[u8]) -> Vec<u8> {
    let mut message = Vec::new();
    let mut rest = capture;
    while rest.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        message.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
    message
}

fn done(buf: &[u8]) -> Peeked {
    match inspect(buf) {
        Progress::Done(p) => p,
        other => panic!("expected a decision, got {other:?}"),
    }
}

#[test]
fn openssl_client_hello_gives_name_and_alpn() {
    let p = done(OPENSSL_PLAIN);
    assert_eq!(p.protocol, Protocol::Tls);
    assert_eq!(p.name.as_deref(), Some("git.example.com"));
    assert_eq!(p.alpn, ["h2", "http/1.1"]);
    assert!(!p.ech);
    assert_eq!(done(CURL).name.as_deref(), Some("www.example.org"));
}

#[test]
fn large_client_hello_spans_segments_and_is_normalised() {
    assert!(OPENSSL_LARGE.len() > 1500);
    let p = done(OPENSSL_LARGE);
    // Sent as "Blog.Example.COM.": case and the trailing dot are ignored.
    assert_eq!(p.name.as_deref(), Some("blog.example.com"));
    assert_eq!(p.alpn.len(), 9);
}

#[test]
fn every_prefix_needs_more() {
    for capture in [OPENSSL_PLAIN, OPENSSL_LARGE, CURL] {
        for n in 0..capture.len() {
            assert_eq!(
                inspect(&capture[..n]),
                Progress::NeedMore,
                "prefix of {n} bytes"
            );
        }
    }
}

#[test]
fn client_hello_over_several_records() {
    let message = message_of(OPENSSL_LARGE);
    for size in [1, 2, 7, 100, 500, 1000] {
        let split = records(&message, size.max(message.len() / tls::MAX_RECORDS + 1));
        let p = done(&split);
        assert_eq!(
            p.name.as_deref(),
            Some("blog.example.com"),
            "records of {size}"
        );
    }
    let too_many = records(&message, message.len() / (tls::MAX_RECORDS + 1));
    assert_eq!(
        inspect(&too_many),
        Progress::Failed(Malformed::TooManyRecords)
    );
}

#[test]
fn ech_routes_by_outer_name() {
    let message = client_hello(&[sni_extension(b"public.example.net"), (0xfe0d, vec![0; 40])]);
    let p = done(&records(&message, 16384));
    assert!(p.ech);
    assert_eq!(p.name.as_deref(), Some("public.example.net"));
}

#[test]
fn client_hello_without_extensions_has_no_name() {
    let p = done(&records(&client_hello(&[]), 16384));
    assert_eq!(p.protocol, Protocol::Tls);
    assert_eq!(p.name, None);
}

#[test]
fn hostile_client_hellos_fail_cleanly() {
    // A 1 MiB claim: refused from the first 9 bytes, before any of it is read.
    let claim = [22, 3, 1, 0, 4, 1, 0x10, 0, 0];
    assert!(matches!(
        inspect(&claim),
        Progress::Failed(Malformed::TooLarge { .. })
    ));
    // A record over 16 KiB, an empty record, a record that is not a handshake.
    assert_eq!(
        inspect(&[22, 3, 1, 0x40, 1]),
        Progress::Failed(Malformed::TlsRecord)
    );
    assert_eq!(
        inspect(&[22, 3, 1, 0, 0]),
        Progress::Failed(Malformed::TlsRecord)
    );
    assert_eq!(
        inspect(&[22, 3, 1, 0, 4, 2, 0, 0, 0]),
        Progress::Failed(Malformed::NotClientHello)
    );
    // A ClientHello whose inside is garbage.
    let garbage = records(&[1, 0, 0, 3, 0xff, 0xff, 0xff], 100);
    assert_eq!(inspect(&garbage), Progress::Failed(Malformed::ClientHello));
    // A handshake record followed by an alert record before the message is complete.
    let mut mixed = records(&message_of(OPENSSL_PLAIN)[..20], 100);
    mixed.extend_from_slice(&[21, 3, 3, 0, 2, 2, 40]);
    assert_eq!(inspect(&mixed), Progress::Failed(Malformed::TlsRecord));
}

#[test]
fn sni_with_odd_bytes_is_escaped_and_never_matches() {
    let message = client_hello(&[sni_extension(b"a\nb.example.com")]);
    let p = done(&records(&message, 16384));
    let name = p.name.clone().unwrap();
    assert!(!name.contains('\n'), "{name}");
    let rule = Match {
        sni: vec![NamePattern::parse("*.example.com").unwrap()],
        ..Match::default()
    };
    assert!(!rule.matches(&p));
}

#[test]
fn http_head_gives_host_without_port() {
    let p = done(CURL_HTTP);
    assert_eq!(p.protocol, Protocol::Http);
    assert_eq!(p.name.as_deref(), Some("www.example.org"));
    for n in 0..CURL_HTTP.len() {
        assert_eq!(
            inspect(&CURL_HTTP[..n]),
            Progress::NeedMore,
            "prefix of {n} bytes"
        );
    }
    let v6 = done(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n");
    assert_eq!(v6.name.as_deref(), Some("[2001:db8::1]"));
    let absolute = done(b"GET http://Abs.Example.com:8080/x HTTP/1.1\r\nHost: other\r\n\r\n");
    assert_eq!(absolute.name.as_deref(), Some("abs.example.com"));
    let old = done(b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(old.name, None);
}

#[test]
fn broken_http_heads_fail_cleanly() {
    let dup = b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n";
    assert_eq!(inspect(dup), Progress::Failed(Malformed::DuplicateHost));
    let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
    big.resize(http::MAX_HEAD, b'a');
    assert!(matches!(
        inspect(&big),
        Progress::Failed(Malformed::TooLarge { .. })
    ));
    assert_eq!(
        inspect(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"),
        Progress::Failed(Malformed::HttpHead)
    );
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for _ in 0..200 {
        many.extend_from_slice(b"A: b\r\n");
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(inspect(&many), Progress::Failed(Malformed::TooManyHeaders));
}

#[test]
fn other_protocols_are_told_apart_early() {
    assert_eq!(done(b"SSH-2.0-OpenSSH_9.2\r\n").protocol, Protocol::Other);
    assert_eq!(done(b"\x00\x01").protocol, Protocol::Other);
    assert_eq!(done(b"GETX").protocol, Protocol::Other);
    // Could still become "GET " or a TLS record.
    assert_eq!(inspect(b"GE"), Progress::NeedMore);
    assert_eq!(inspect(b"\x16"), Progress::NeedMore);
    assert_eq!(done(b"\x16\x01").protocol, Protocol::Other);
}

#[test]
fn name_patterns() {
    let exact = NamePattern::parse("Blog.Example.com.").unwrap();
    assert!(exact.matches("blog.example.com"));
    assert!(!exact.matches("x.blog.example.com"));
    let wild = NamePattern::parse("*.example.org").unwrap();
    assert_eq!(wild.to_string(), "*.example.org");
    assert!(wild.matches("a.example.org"));
    assert!(wild.matches("a.b.example.org"));
    assert!(!wild.matches("example.org"));
    assert!(!wild.matches("aexample.org"));
    for bad in [
        "",
        "192.0.2.1",
        "[2001:db8::1]",
        "2001:db8::1",
        "a..b",
        "-a.com",
        "a b.com",
        "*",
        "a.*.com",
        "*.",
        "x.123",
        "é.com",
    ] {
        assert!(NamePattern::parse(bad).is_err(), "{bad:?} accepted");
    }
    assert!(matches!(
        NamePattern::parse("10.1.2.3"),
        Err(NameError::IpLiteral(_))
    ));
    assert!(NamePattern::parse(&format!("{}.com", "a".repeat(64))).is_err());
}

#[test]
fn first_match_wins_and_all_conditions_hold() {
    let pat = |s: &str| NamePattern::parse(s).unwrap();
    let rules = [
        Match {
            sni: vec![pat("git.example.com")],
            alpn: vec!["h2".into()],
            ..Match::default()
        },
        Match {
            sni: vec![pat("*.example.com")],
            ..Match::default()
        },
        Match {
            host: vec![pat("blog.example.com")],
            ..Match::default()
        },
        Match {
            protocol: Some(Protocol::Other),
            ..Match::default()
        },
    ];
    let tls = |name: &str, alpn: &[&str]| Peeked {
        name: Some(name.into()),
        alpn: alpn.iter().map(|s| s.to_string()).collect(),
        ..Peeked::new(Protocol::Tls)
    };
    assert_eq!(
        first_match(&rules, &tls("git.example.com", &["http/1.1", "h2"])),
        Some(0)
    );
    assert_eq!(
        first_match(&rules, &tls("git.example.com", &["http/1.1"])),
        Some(1)
    );
    assert_eq!(first_match(&rules, &tls("blog.example.com", &[])), Some(1));
    assert_eq!(first_match(&rules, &tls("example.net", &[])), None);
    let http = Peeked {
        name: Some("blog.example.com".into()),
        ..Peeked::new(Protocol::Http)
    };
    assert_eq!(first_match(&rules, &http), Some(2));
    assert_eq!(first_match(&rules, &Peeked::new(Protocol::Http)), None);
    assert_eq!(first_match(&rules, &Peeked::new(Protocol::Other)), Some(3));
    assert_eq!(rules[0].to_string(), "sni=git.example.com alpn=h2");
    let both = Match {
        sni: vec![pat("a.com")],
        host: vec![pat("a.com")],
        ..Match::default()
    };
    assert!(both.contradiction().is_some());
    assert!(rules.iter().all(|r| r.contradiction().is_none()));
}

#[test]
fn replies_are_well_formed() {
    let alert = tls::UNRECOGNIZED_NAME_ALERT;
    assert_eq!(alert, [21, 3, 3, 0, 2, 2, 112]);
    let response = http::misdirected_response();
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut parsed = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = parsed.parse(response).unwrap() else {
        panic!("incomplete 421");
    };
    assert_eq!(parsed.code, Some(421));
    let length = parsed
        .headers
        .iter()
        .find(|h| h.name == "Content-Length")
        .unwrap();
    let length: usize = std::str::from_utf8(length.value).unwrap().parse().unwrap();
    assert_eq!(response.len() - head, length);
}

#[tokio::test(start_paused = true)]
async fn read_head_outcomes() {
    let limit = Duration::from_secs(5);
    // One byte per write: reassembled.
    let (mut client, mut server) = tokio::io::duplex(64);
    let writer = tokio::spawn(async move {
        for b in OPENSSL_PLAIN {
            client.write_all(&[*b]).await.unwrap();
        }
        client
    });
    let (bytes, verdict) = read_head(&mut server, limit).await;
    assert_eq!(bytes, OPENSSL_PLAIN);
    assert!(matches!(verdict, Verdict::Peeked(p) if p.name.as_deref() == Some("git.example.com")));
    let mut client = writer.await.unwrap();
    // Silent, then stalled after a few bytes, then closed mid-record.
    let (bytes, verdict) = read_head(&mut server, limit).await;
    assert!(
        bytes.is_empty() && matches!(verdict, Verdict::Silent),
        "{verdict}"
    );
    client.write_all(&OPENSSL_PLAIN[..10]).await.unwrap();
    let (bytes, verdict) = read_head(&mut server, limit).await;
    assert!(
        bytes.len() == 10 && matches!(verdict, Verdict::Stalled),
        "{verdict}"
    );
    client.write_all(&OPENSSL_PLAIN[..10]).await.unwrap();
    drop(client);
    let (bytes, verdict) = read_head(&mut server, limit).await;
    assert!(
        bytes.len() == 10 && matches!(verdict, Verdict::Closed),
        "{verdict}"
    );
}

#[tokio::test(start_paused = true)]
async fn read_head_after_starts_with_the_early_bytes() {
    let limit = Duration::from_secs(5);
    let (mut client, mut server) = tokio::io::duplex(64);
    // A whole ClientHello already read (it came after a PROXY header): decided without a read.
    let (bytes, verdict) = read_head_after(&mut server, limit, OPENSSL_PLAIN.to_vec()).await;
    assert_eq!(bytes, OPENSSL_PLAIN);
    assert!(matches!(verdict, Verdict::Peeked(p) if p.name.as_deref() == Some("git.example.com")));
    // Part of it: the rest is read and appended.
    let writer = tokio::spawn(async move {
        client.write_all(&OPENSSL_PLAIN[7..]).await.unwrap();
        client
    });
    let early = OPENSSL_PLAIN[..7].to_vec();
    let (bytes, verdict) = read_head_after(&mut server, limit, early).await;
    let _client = writer.await.unwrap();
    assert_eq!(bytes, OPENSSL_PLAIN);
    assert!(matches!(verdict, Verdict::Peeked(_)), "{verdict}");
    // Early bytes and then silence: stalled, not silent.
    let (bytes, verdict) = read_head_after(&mut server, limit, OPENSSL_PLAIN[..3].to_vec()).await;
    assert!(
        bytes.len() == 3 && matches!(verdict, Verdict::Stalled),
        "{verdict}"
    );
}

#[test]
fn decisions() {
    let pat = |s: &str| NamePattern::parse(s).unwrap();
    let rules = [Match {
        sni: vec![pat("a.example.com")],
        ..Match::default()
    }];
    let tls = |name: &str| {
        Verdict::Peeked(Peeked {
            name: Some(name.into()),
            ..Peeked::new(Protocol::Tls)
        })
    };
    assert_eq!(
        decide(&tls("a.example.com"), &rules, false),
        (Decision::Matched(0), Outcome::Matched)
    );
    assert_eq!(
        decide(&tls("b.example.com"), &rules, true),
        (Decision::Default, Outcome::Default)
    );
    let (refuse, outcome) = decide(&tls("b.example.com"), &rules, false);
    assert_eq!(
        refuse,
        Decision::Refuse {
            reply: Some(&tls::UNRECOGNIZED_NAME_ALERT[..])
        }
    );
    assert_eq!(outcome, Outcome::NoMatch);
    let http = Verdict::Peeked(Peeked::new(Protocol::Http));
    assert_eq!(
        decide(&http, &rules, false).0,
        Decision::Refuse {
            reply: Some(http::misdirected_response())
        }
    );
    let other = Verdict::Peeked(Peeked::new(Protocol::Other));
    assert_eq!(
        decide(&other, &rules, false).0,
        Decision::Refuse { reply: None }
    );
    assert_eq!(
        decide(&Verdict::Silent, &rules, true),
        (Decision::Default, Outcome::SilentDefault)
    );
    assert_eq!(
        decide(&Verdict::Silent, &rules, false),
        (Decision::Close, Outcome::Silent)
    );
    assert_eq!(
        decide(&Verdict::Stalled, &rules, true),
        (Decision::Close, Outcome::Timeout)
    );
    let broken = Verdict::Malformed(Malformed::ClientHello);
    assert_eq!(
        decide(&broken, &rules, true),
        (Decision::Close, Outcome::Malformed)
    );
    assert!(Outcome::ALL.iter().enumerate().all(|(i, o)| o.index() == i));
}
