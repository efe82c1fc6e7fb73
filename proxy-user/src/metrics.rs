//! Prometheus metrics in the text exposition format (version 0.0.4), served over plain HTTP on
//! the address of the `metrics` key; off unless that key is set.
//!
//! Per route: connections accepted, live and failed by reason; bytes each way of closed
//! connections (the verdict program's counts for sockmap, the userspace paths' own otherwise);
//! closed connections per data path; the data path new connections use; how trusted front
//! proxies' PROXY headers were read.
use std::{fmt::Write as _, io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{
    addr::Endpoint,
    forward::DataPath,
    registry::{Failure, Registry, RouteCounters},
    xdp::Reason,
};

// The HTTP server and the text format are kept by hand: one GET on a local port, read with a
// bound of 8 KiB and 5 s, and a dozen counter families; hyper and prometheus-client would add
// about forty crates to the daemon for that.

/// A scrape must send its request head within this time, in at most [`MAX_REQUEST`] bytes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST: usize = 8192;

/// Binds `addr` and serves until `stop`. Returns the bound address (port 0 picks one).
pub(crate) async fn start(
    addr: &Endpoint,
    registry: Arc<Registry>,
    stop: CancellationToken,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let resolved = addr.resolve().await.map_err(io::Error::other)?;
    let first = *resolved
        .first()
        .ok_or_else(|| io::Error::other("the address resolved to nothing"))?;
    let listener = TcpListener::bind(first).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = stop.cancelled() => return,
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &registry)).await;
            });
        }
    });
    Ok((bound, task))
}

async fn answer(mut stream: TcpStream, registry: &Registry) -> io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || request.len() + n > MAX_REQUEST {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (parts.next(), parts.next());
    let (status, body) = match (method, target) {
        (Some(b"GET"), Some(b"/metrics")) => {
            let mut text = render(registry);
            crate::upstream::render_metrics(&registry.upstream_status(), &mut text);
            ("200 OK", text)
        }
        (Some(b"GET"), _) => ("404 Not Found", "metrics are at /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "use GET /metrics\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// One metric family: its HELP and TYPE lines, then a line per row (`{labels} value`).
fn write_family(
    out: &mut String,
    (name, kind, help): (&str, &str, &str),
    rows: &mut dyn Iterator<Item = String>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for row in rows {
        let _ = writeln!(out, "{name}{row}");
    }
}

/// The exposition text. Route names are `[A-Za-z0-9_.-]+`, so labels need no escaping.
pub(crate) fn render(registry: &Registry) -> String {
    let routes = registry.routes();
    let mut out = String::new();
    let mut family =
        |name: &str, kind: &str, help: &str, rows: &mut dyn Iterator<Item = String>| {
            write_family(&mut out, (name, kind, help), rows)
        };
    use std::sync::atomic::Ordering::Relaxed;
    family(
        "spliced_connections_total",
        "counter",
        "Connections accepted, refused ones included.",
        &mut routes
            .iter()
            .map(|(r, c)| format!("{{route=\"{r}\"}} {}", c.total.load(Relaxed))),
    );
    family(
        "spliced_connections_active",
        "gauge",
        "Connections live now.",
        &mut routes
            .iter()
            .map(|(r, c)| format!("{{route=\"{r}\"}} {}", c.active.load(Relaxed))),
    );
    family(
        "spliced_connections_failed_total",
        "counter",
        "Connections refused, not dialed, or ended by a reset, a timeout or a failure, by reason.",
        &mut routes.iter().flat_map(|(r, c)| {
            Failure::ALL.iter().map(move |f| {
                format!(
                    "{{route=\"{r}\",reason=\"{}\"}} {}",
                    f.as_str(),
                    c.failed(*f)
                )
            })
        }),
    );
    family(
        "spliced_bytes_total",
        "counter",
        "Bytes carried by closed connections: up is client to upstream, down the reverse.",
        &mut routes.iter().flat_map(|(r, c)| {
            [
                ("up", c.bytes_up.load(Relaxed)),
                ("down", c.bytes_down.load(Relaxed)),
            ]
            .map(|(d, n)| format!("{{route=\"{r}\",direction=\"{d}\"}} {n}"))
        }),
    );
    let paths = [DataPath::Sockmap, DataPath::Splice, DataPath::Copy];
    family(
        "spliced_connections_closed_total",
        "counter",
        "Closed connections by the data path that carried them.",
        &mut routes.iter().flat_map(|(r, c)| {
            paths.map(|p| format!("{{route=\"{r}\",path=\"{p}\"}} {}", c.closed_on(p)))
        }),
    );
    family(
        "spliced_route_data_path",
        "gauge",
        "1 for the data path new connections of the route use.",
        &mut routes.iter().filter_map(|(r, c)| {
            c.path()
                .map(|p| format!("{{route=\"{r}\",path=\"{p}\"}} 1"))
        }),
    );
    refused(registry, &mut out);
    lane_families(&mut out);
    routing_families(&routes, &mut out);
    proxy_header_family(&routes, &mut out);
    out
}

/// `spliced_proxy_header_total{route,outcome}`: how reading trusted sources' PROXY headers
/// ended (issue 13).
fn proxy_header_family(routes: &[(String, Arc<RouteCounters>)], out: &mut String) {
    write_family(
        out,
        (
            "spliced_proxy_header_total",
            "counter",
            "PROXY headers read from sources in accept_proxy: proxied, local (v2 LOCAL, v1 \
             UNKNOWN), or rejected and closed (missing, too_long, malformed, truncated, timeout, \
             read_error).",
        ),
        &mut routes.iter().flat_map(|(r, c)| {
            crate::proxy_header::Outcome::ALL.map(|o| {
                format!(
                    "{{route=\"{r}\",outcome=\"{}\"}} {}",
                    o.as_str(),
                    c.proxy_headers(o)
                )
            })
        }),
    );
}

/// The accept steering's families, once the lanes accept: connections handed to each lane, and
/// each lane's live ones.
fn lane_families(out: &mut String) {
    let Some(steer) = crate::steer::loaded().filter(|s| s.lanes() > 0) else {
        return;
    };
    write_family(
        out,
        (
            "spliced_lane_steered_total",
            "counter",
            "Connections the accept steering handed to each lane.",
        ),
        &mut steer
            .picks()
            .into_iter()
            .enumerate()
            .map(|(l, n)| format!("{{lane=\"{l}\"}} {n}")),
    );
    write_family(
        out,
        (
            "spliced_lane_connections_active",
            "gauge",
            "Connections accepted on each lane and live now.",
        ),
        &mut steer
            .live()
            .into_iter()
            .enumerate()
            .map(|(l, n)| format!("{{lane=\"{l}\"}} {n}")),
    );
}

/// `spliced_refused_total{route,reason,at}`: the source rules' refusals, in XDP and at accept.
fn refused(registry: &Registry, out: &mut String) {
    let Some(filters) = registry.filters() else {
        return;
    };
    let name = "spliced_refused_total";
    let _ = writeln!(
        out,
        "# HELP {name} Sources refused by the route's allow or deny (reason acl) or syn_rate: \
         SYNs the XDP front dropped (at xdp), connections reset at accept (at accept).\n\
         # TYPE {name} counter"
    );
    for (r, _, counts) in filters.summary() {
        for (reason, c) in Reason::ALL.iter().zip(counts) {
            for (at, n) in [("xdp", c.xdp), ("accept", c.accept)] {
                let reason = reason.label();
                let _ = writeln!(
                    out,
                    "{name}{{route=\"{r}\",reason=\"{reason}\",at=\"{at}\"}} {n}"
                );
            }
        }
    }
}

/// The routing families (issue 12): how peeks ended and what each match took.
fn routing_families(routes: &[(String, Arc<RouteCounters>)], out: &mut String) {
    let mut family =
        |name: &str, kind: &str, help: &str, rows: &mut dyn Iterator<Item = String>| {
            write_family(out, (name, kind, help), rows)
        };
    family(
        "spliced_route_peek_total",
        "counter",
        "How reading the first bytes ended on routes with matches: matched, default, \
         silent_default, no_match (alert or 421 sent), silent, timeout, closed, malformed.",
        &mut routes.iter().flat_map(|(r, c)| {
            crate::peek::Outcome::ALL.map(|o| {
                format!(
                    "{{route=\"{r}\",outcome=\"{}\"}} {}",
                    o.as_str(),
                    c.peeks(o)
                )
            })
        }),
    );
    family(
        "spliced_route_match_total",
        "counter",
        "Connections each [[route.match]] took, by its index in the route (match[0] first).",
        &mut routes.iter().flat_map(|(r, c)| {
            c.matches()
                .into_iter()
                .enumerate()
                .map(move |(i, n)| format!("{{route=\"{r}\",rule=\"match[{i}]\"}} {n}"))
        }),
    );
}

#[cfg(test)]
mod tests;
