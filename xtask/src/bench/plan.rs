//! How much of everything a run measures (`--quick` or full), the servers' ports, and the
//! figure columns of the table.
use std::time::Duration;

use super::{
    contenders::Contender,
    notes::Notes,
    perf::Perf,
    report::{self, Figure},
    shorts::Amount,
};

/// iperf3's server port in the namespace.
pub const IPERF_PORT: u16 = 5201;
/// The echo server's port in the namespace. It also listens on the ports after it, one for each
/// contender in each round, for the small-message cases (see [`small_port`]).
pub const ECHO_PORT: u16 = 7000;
/// Idle connections of a full run, if the open-file limit allows.
const FULL_IDLE: usize = 10_000;

/// The upstream port of `c`'s small-message cases in `round` (from 1): a port of its own, so
/// that the forwarder's upstream sockets that another contender's client-closes-first case left
/// in TIME_WAIT (60 s) never share its ephemeral port range toward the upstream.
pub fn small_port(round: usize, c: Contender) -> u16 {
    let i = Contender::ALL.iter().position(|&x| x == c).unwrap_or(0);
    ECHO_PORT + 1 + ((round - 1) * Contender::ALL.len() + i) as u16
}

/// How much of everything.
pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
    /// The rows, in [`Contender::ALL`]'s order (`--contender` picks some).
    pub contenders: Vec<Contender>,
    /// iperf3's `-t SECS` or `-n BYTES`, each way.
    pub iperf_amount: [&'static str; 2],
    pub rr_dur: Duration,
    pub rr_max: usize,
    /// Short connections, the upstream closing first.
    pub short: Amount,
    /// Short connections, the client closing first: fewer than 10,000, so the TIME_WAIT they
    /// leave (two per connection for a forwarder) stays well inside the ephemeral port range.
    pub client_closes: Amount,
    /// The live connection counts the ramp stops at, in order, and what is measured there
    /// (none with `--no-idle`).
    pub levels: Vec<Level>,
    /// The bulk cases run (not with `--no-bulk`).
    pub bulk: bool,
    pub probes: usize,
    pub open_threads: usize,
    /// `--perf DIR`.
    pub perf: Option<Perf>,
}

impl Plan {
    /// The options that shaped this run, as typed (` --quick`, ` --contender NAME`,
    /// ` --no-idle`, ` --no-bulk`), for the report's first line.
    pub fn flags(&self) -> String {
        let mut out = String::new();
        if self.quick {
            out.push_str(" --quick");
        }
        if self.contenders.len() < Contender::ALL.len() {
            for c in self.contenders.iter().filter(|c| !c.always_runs()) {
                out.push_str(" --contender ");
                out.push_str(c.slug());
            }
        }
        if self.levels.is_empty() {
            out.push_str(" --no-idle");
        }
        if !self.bulk {
            out.push_str(" --no-bulk");
        }
        out
    }

    /// The profiler for cases of `round`: the first round only.
    pub fn perf(&self, round: usize) -> Option<&Perf> {
        self.perf.as_ref().filter(|_| round == 1)
    }
}

/// A stop of the idle-connection ramp, with the figure columns it fills.
pub struct Level {
    pub count: usize,
    /// Set-up time is probed here, into this column.
    pub setup_fig: Option<usize>,
    /// Memory is read here, into these columns (daemon, kernel).
    pub memory_figs: Option<(usize, usize)>,
}

impl Plan {
    /// `nofile`: the open-file limit every process here gets. A forwarder holds two sockets per
    /// connection, so N must fit twice under it. Where the limit is too low for forwarders that
    /// also hold two pipes per connection (6 descriptors), memory is read at a middle level
    /// too, the most those can hold, so that every contender has a memory figure.
    pub fn new(quick: bool, nofile: u64, notes: &mut Notes) -> Plan {
        let fits = (nofile.saturating_sub(512) / 2) as usize;
        let idle_n = if quick {
            500
        } else if fits >= FULL_IDLE {
            FULL_IDLE
        } else {
            let n = (fits / 1000 * 1000).max(1000);
            notes.push(format!(
                "N = {} idle connections instead of {}: the open-file limit here is {} and \
                 cannot be raised (raising a hard limit needs CAP_SYS_RESOURCE, which this \
                 container lacks); a forwarder holds at least 2 descriptors per connection, \
                 so {} connections would not fit in any forwarder.",
                report::group(n as u64),
                report::group(FULL_IDLE as u64),
                report::group(nofile),
                report::group(FULL_IDLE as u64)
            ));
            n
        };
        let mid = (nofile.saturating_sub(512) / 6) as usize / 1000 * 1000;
        let mid = (!quick && mid >= 1000 && mid < idle_n).then_some(mid);
        if let Some(mid) = mid {
            notes.push(format!(
                "Memory is also read at {} idle connections: with 2 sockets and 2 pipes per \
                 connection (spliced splice, systemd-socket-proxyd), 6 descriptors each, no \
                 more fit under this open-file limit, and this way every contender has a memory \
                 figure.",
                report::group(mid as u64)
            ));
        }
        let probe_counts: Vec<usize> = if quick {
            vec![100, idle_n]
        } else {
            vec![100, 1000, idle_n]
        };
        let mut memory_counts: Vec<usize> = mid.into_iter().collect();
        memory_counts.push(idle_n);
        let mut counts: Vec<usize> = probe_counts.iter().chain(&memory_counts).copied().collect();
        counts.sort_unstable();
        counts.dedup();
        let first_setup = FIRST_MEMORY + 2 * memory_counts.len();
        let levels = counts
            .iter()
            .map(|&count| Level {
                count,
                setup_fig: probe_counts
                    .iter()
                    .position(|&c| c == count)
                    .map(|i| first_setup + i),
                memory_figs: memory_counts
                    .iter()
                    .position(|&c| c == count)
                    .map(|i| (FIRST_MEMORY + 2 * i, FIRST_MEMORY + 2 * i + 1)),
            })
            .collect();
        Plan {
            quick,
            rounds: if quick { 3 } else { 5 },
            contenders: Contender::ALL.to_vec(),
            iperf_amount: if quick { ["-n", "128M"] } else { ["-t", "4"] },
            rr_dur: Duration::from_millis(if quick { 300 } else { 2000 }),
            rr_max: 1_000_000,
            short: Amount {
                workers: 4,
                dur: Duration::from_millis(if quick { 300 } else { 2000 }),
                max: if quick { 3000 } else { 20_000 },
            },
            client_closes: Amount {
                workers: 4,
                dur: Duration::from_millis(if quick { 250 } else { 2000 }),
                max: if quick { 1500 } else { 6000 },
            },
            levels,
            bulk: true,
            probes: if quick { 30 } else { 200 },
            open_threads: 8,
            perf: None,
        }
    }
}

// Figure columns, in table order; then daemon and kernel memory for each memory level, then
// set-up time for each probe level (see `Level`).
pub const UP: usize = 0;
pub const DOWN: usize = 1;
pub const RR: usize = 2;
pub const RR_P50: usize = 3;
pub const RR_P99: usize = 4;
pub const SHORT: usize = 5;
pub const SHORT_CLIENT_CLOSES: usize = 6;
pub const DAEMON_CPU: usize = 7;
pub const ALL_CPU_UP: usize = 8;
pub const ALL_CPU_DOWN: usize = 9;
pub const ALL_CPU_CONN: usize = 10;
pub const ALL_CPU_RR: usize = 11;
const FIRST_MEMORY: usize = 12;

/// The table's columns for `plan`, in order.
pub fn figures(plan: &Plan) -> Vec<Figure> {
    let f = |title: String, higher_better, daemon_only| Figure {
        title,
        higher_better,
        daemon_only,
        measured: true,
    };
    let mut v = vec![
        f("upload Gbit/s".into(), true, false),
        f("download Gbit/s".into(), true, false),
        f("64 B round trips/s".into(), true, false),
        f("round trip p50 µs".into(), false, false),
        f("round trip p99 µs".into(), false, false),
        f("short conn/s".into(), true, false),
        f("short conn/s client closes first".into(), true, false),
        f("daemon CPU s/GB".into(), false, true),
        f("all tasks CPU s/GB up".into(), false, false),
        f("all tasks CPU s/GB down".into(), false, false),
        f("all tasks CPU µs per conn".into(), false, false),
        f("all tasks CPU µs per round trip".into(), false, false),
    ];
    if !plan.bulk {
        for i in [UP, DOWN, DAEMON_CPU, ALL_CPU_UP, ALL_CPU_DOWN] {
            v[i].measured = false;
        }
    }
    let mut memory: Vec<&Level> = plan
        .levels
        .iter()
        .filter(|l| l.memory_figs.is_some())
        .collect();
    memory.sort_by_key(|l| l.memory_figs);
    for l in memory {
        let n = report::group(l.count as u64);
        v.push(f(format!("daemon MiB @{n} idle"), false, true));
        v.push(f(format!("kernel MiB @{n} idle"), false, false));
    }
    let mut setup: Vec<&Level> = plan
        .levels
        .iter()
        .filter(|l| l.setup_fig.is_some())
        .collect();
    setup.sort_by_key(|l| l.setup_fig);
    for l in setup {
        let n = report::group(l.count as u64);
        v.push(f(format!("set-up µs @{n} live"), false, false));
    }
    v
}
