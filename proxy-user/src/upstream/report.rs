//! Upstream servers in `spliced status` and in the metrics.
use std::fmt::Write as _;

use super::{ServerStatus, State};

/// The servers' table of `spliced status`: a summary line, a header and one line per server,
/// columns aligned and separated by two spaces. Only the last column (the last check's result)
/// may contain spaces.
pub fn render_status(servers: &[ServerStatus]) -> String {
    let header = [
        "ROUTE",
        "SERVER",
        "STATE",
        "SINCE",
        "ACTIVE",
        "TOTAL",
        "DIAL_FAILED",
        "CHECK_FAILED",
        "LAST_CHECK",
    ];
    let mut rows = vec![header.map(str::to_owned)];
    for s in servers {
        let state = match (s.state, s.backup) {
            (State::Up, false) => "up",
            (State::Up, true) => "backup",
            (State::Down, false) => "down",
            (State::Down, true) => "backup-down",
        };
        let last = match &s.last_check {
            None => "-".to_owned(),
            Some(o) => format!(
                "{} {:.1}s ago: {}",
                if o.ok { "ok" } else { "failed" },
                o.at.elapsed().as_secs_f64(),
                o.detail
            ),
        };
        rows.push([
            s.scope.clone(),
            s.name.clone(),
            state.to_owned(),
            format!("{:.1}s", s.since.as_secs_f64()),
            s.active.to_string(),
            s.total.to_string(),
            s.dial_failures.to_string(),
            s.check_failures.to_string(),
            last,
        ]);
    }
    format!(
        "{} upstream server(s)\n{}",
        servers.len(),
        crate::text::columns(&rows)
    )
}

/// A label value in the exposition format: `\`, `"` and newlines escaped.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The upstream families of the Prometheus text, appended to `out`: per server, whether it is up,
/// its live and total connections, failed dials and failed checks.
pub fn render_metrics(servers: &[ServerStatus], out: &mut String) {
    type Value = fn(&ServerStatus) -> u64;
    let families: [(&str, &str, &str, Value); 6] = [
        (
            "spliced_upstream_up",
            "gauge",
            "1 while the server takes new connections, 0 while it is down.",
            |s| u64::from(s.state == State::Up),
        ),
        (
            "spliced_upstream_connections_active",
            "gauge",
            "Connections live now on the server.",
            |s| s.active,
        ),
        (
            "spliced_upstream_connections_total",
            "counter",
            "Connections the server took.",
            |s| s.total,
        ),
        (
            "spliced_upstream_dial_failures_total",
            "counter",
            "Dials to the server that were refused, unreachable or timed out.",
            |s| s.dial_failures,
        ),
        (
            "spliced_upstream_check_failures_total",
            "counter",
            "Failed health checks (and recovery probes) of the server.",
            |s| s.check_failures,
        ),
        (
            "spliced_upstream_port_search_dials_total",
            "counter",
            "Dials to the server that spent over 250 us on the CPU in connect() finding a free \
             local port, or found none, while TIME_WAIT sockets filled the port range.",
            |s| s.port_search_dials,
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for s in servers {
            let _ = writeln!(
                out,
                "{name}{{route=\"{}\",server=\"{}\"}} {}",
                label(&s.scope),
                label(&s.name),
                value(s)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::upstream::Observation;

    fn status(name: &str, state: State, backup: bool) -> ServerStatus {
        ServerStatus {
            scope: "web".into(),
            name: name.into(),
            backup,
            weight: 1,
            state,
            since: Duration::from_millis(1500),
            last_check: None,
            active: 2,
            total: 10,
            dial_failures: 1,
            check_failures: 3,
            port_search_dials: 4,
        }
    }

    #[test]
    fn status_table() {
        let mut a = status("[fe80::2%lxdbr0]:80", State::Up, false);
        a.last_check = Some(Observation {
            ok: true,
            detail: "connected in 1 ms".into(),
            at: Instant::now(),
        });
        let b = status("app.lxd:80@10.0.0.3:80", State::Down, true);
        let text = render_status(&[a, b]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "2 upstream server(s)");
        let fields: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(fields[..3], ["ROUTE", "SERVER", "STATE"]);
        let row: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            row[..8],
            [
                "web",
                "[fe80::2%lxdbr0]:80",
                "up",
                "1.5s",
                "2",
                "10",
                "1",
                "3"
            ]
        );
        assert!(lines[2].ends_with("s ago: connected in 1 ms"), "{text}");
        assert!(lines[3].contains("  backup-down  "), "{text}");
        assert!(lines[3].ends_with("  -"), "{text}");
        assert_eq!(lines[1].find("STATE"), lines[2].find("up  "));
    }

    #[test]
    fn metrics_families() {
        let mut out = String::new();
        render_metrics(
            &[
                status("10.0.0.1:80", State::Up, false),
                status("10.0.0.2:80", State::Down, false),
            ],
            &mut out,
        );
        for line in [
            "# TYPE spliced_upstream_up gauge",
            "spliced_upstream_up{route=\"web\",server=\"10.0.0.1:80\"} 1",
            "spliced_upstream_up{route=\"web\",server=\"10.0.0.2:80\"} 0",
            "spliced_upstream_connections_active{route=\"web\",server=\"10.0.0.1:80\"} 2",
            "spliced_upstream_connections_total{route=\"web\",server=\"10.0.0.1:80\"} 10",
            "spliced_upstream_dial_failures_total{route=\"web\",server=\"10.0.0.2:80\"} 1",
            "spliced_upstream_check_failures_total{route=\"web\",server=\"10.0.0.2:80\"} 3",
            "spliced_upstream_port_search_dials_total{route=\"web\",server=\"10.0.0.2:80\"} 4",
        ] {
            assert!(out.lines().any(|l| l == line), "{line:?} missing:\n{out}");
        }
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
