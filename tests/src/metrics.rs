//! The Prometheus metrics endpoint: where the daemon serves it, a scrape, a sample's value.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use crate::{set_timeouts, wait_until, Spliced};

/// The metrics address the daemon logged.
pub fn metrics_addr(spliced: &Spliced) -> SocketAddr {
    let log = spliced.wait_log("Prometheus text on http://", 1, crate::LOG_WAIT);
    let line = log
        .lines()
        .find(|l| l.contains("Prometheus text on"))
        .unwrap();
    let rest = line.split("http://").nth(1).unwrap();
    rest.split('/').next().unwrap().parse().unwrap()
}

/// Sends the raw `request` to the HTTP server at `addr`; returns the whole reply (it closes).
pub fn http_request(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    set_timeouts(&s, Duration::from_secs(10));
    s.write_all(request).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read the reply");
    reply
}

/// GET /metrics; returns the body after checking the status and content type.
pub fn scrape(addr: SocketAddr) -> String {
    let reply = http_request(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

/// The value of the sample `series` (`name{labels}`) in a scrape.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .parse()
        .unwrap()
}

/// Scrapes until `series` has `value` (at most 10 s); returns the last scrape.
pub fn wait_metric(addr: SocketAddr, series: &str, value: u64) -> String {
    let found = || {
        let text = scrape(addr);
        (metric(&text, series) == value).then_some(text)
    };
    let failure = || format!("{series} is not {value} after 10 s:\n{}", scrape(addr));
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        found,
        failure,
    )
}
