use super::*;

#[test]
fn exposition_format() {
    let registry = Registry::default();
    let web = registry.route("web");
    web.total.fetch_add(3, std::sync::atomic::Ordering::Relaxed);
    web.fail(Failure::RouteMaxConnections);
    web.closed(DataPath::Sockmap, 100, 2000);
    web.set_path(DataPath::Sockmap);
    web.proxy_header(crate::proxy_header::Outcome::Proxied);
    web.proxy_header(crate::proxy_header::Outcome::Timeout);
    web.fail(Failure::ProxyHeader);
    let text = render(&registry);
    for line in [
        "# TYPE spliced_connections_total counter",
        "spliced_connections_total{route=\"web\"} 3",
        "spliced_connections_active{route=\"web\"} 0",
        "spliced_connections_failed_total{route=\"web\",reason=\"route_max_connections\"} 1",
        "spliced_connections_failed_total{route=\"web\",reason=\"idle_timeout\"} 0",
        "spliced_bytes_total{route=\"web\",direction=\"up\"} 100",
        "spliced_bytes_total{route=\"web\",direction=\"down\"} 2000",
        "spliced_connections_closed_total{route=\"web\",path=\"sockmap\"} 1",
        "spliced_connections_closed_total{route=\"web\",path=\"copy\"} 0",
        "spliced_route_data_path{route=\"web\",path=\"sockmap\"} 1",
        "# TYPE spliced_proxy_header_total counter",
        "spliced_proxy_header_total{route=\"web\",outcome=\"proxied\"} 1",
        "spliced_proxy_header_total{route=\"web\",outcome=\"timeout\"} 1",
        "spliced_proxy_header_total{route=\"web\",outcome=\"local\"} 0",
        "spliced_connections_failed_total{route=\"web\",reason=\"proxy_header\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
    }
    // Every sample line is `name{labels} value`, and every family has HELP and TYPE.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = l.rsplit_once(' ').unwrap();
        value.parse::<u64>().unwrap();
    }
    assert_eq!(
        text.matches("# HELP").count(),
        text.matches("# TYPE").count()
    );
}
