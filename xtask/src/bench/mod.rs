//! `cargo xtask bench [--quick] [--output FILE] [--perf DIR]`: spliced's data paths (and its
//! SNI-routed route) against a direct connection, socat, HAProxy and systemd-socket-proxyd, on
//! the situation spliced is for: a client on the host, a forwarder on 127.0.0.1, an upstream at
//! an IPv6 link-local address (fe80::2, `nodad`) in a network namespace behind a veth pair.
//!
//! Contenders are interleaved round by round (A B C … A B C …) and every figure is the median
//! over the rounds. Per round and contender: an upload and a download with iperf3 (and the CPU
//! they cost, the forwarder's and every task's on the machine), then, on a fresh forwarder, idle
//! connections ramped to 100, 1,000 and N with set-up probes at each level and memory at N,
//! 64-byte round trips on one connection, and short connections the upstream closes first
//! (their rate and every task's CPU per connection); last, on another fresh forwarder in front
//! of an upstream port of its own, short connections the client closes first. The report goes
//! to `docs/benchmarks.md` with a chart in `docs/benchmarks.svg`, and the table to stdout; the
//! table is parsed back and checked before the command succeeds.
mod bulk;
mod chart;
mod client;
mod contenders;
mod cpu;
mod front_cost;
mod hello;
mod perf;
mod report;
mod server;
mod shorts;
mod sys;
mod time_wait;
mod topology;
mod verdict;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use self::{
    client::{Closer, Target},
    contenders::{Contender, Env, Instance, ProxydForm},
    perf::Perf,
    report::{Figure, Row, Sample},
    shorts::{Amount, TimeWait},
    topology::{check_stop, sleep, Guard, Proc},
};
use crate::util::{is_root, reexec_as_root, workspace_root};

pub use report::validate;

/// iperf3's server port in the namespace.
const IPERF_PORT: u16 = 5201;
/// The echo server's port in the namespace. It also listens on the ports after it, one for each
/// contender in each round, for the small-message cases (see [`small_port`]).
const ECHO_PORT: u16 = 7000;
/// Idle connections of a full run, if the open-file limit allows.
const FULL_IDLE: usize = 10_000;

#[derive(clap::Args)]
pub struct Args {
    /// A short run (about 2 minutes on an idle machine; CI runs it): 3 rounds, 128 MiB iperf3
    /// runs each way, 500 idle connections, well under a second per small-message case.
    #[arg(long)]
    pub quick: bool,
    /// Rounds instead of the default (5, or 3 with --quick); every figure is the median over
    /// them.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=20))]
    pub rounds: Option<u16>,
    /// The markdown report (default docs/benchmarks.md); the chart goes beside it, same name
    /// with .svg.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Profile each case (upload, download, round trips, short connections) of each
    /// contender's first round with `perf record -g`, on the forwarder and machine-wide, and
    /// write `perf report --stdio` summaries into DIR. Off by default: perf's load would show
    /// in the figures.
    #[arg(long, value_name = "DIR")]
    pub perf: Option<PathBuf>,
    /// Instead of the figures: sustained short connections where the client closes first
    /// (TIME_WAIT on the forwarder), spliced and HAProxy with `tcp_tw_reuse` 2 and 1; writes
    /// its own section of the report. Not part of `--quick`.
    #[arg(long)]
    pub time_wait: bool,
    /// With --time-wait: seconds per run.
    #[arg(long, default_value_t = 60, requires = "time_wait")]
    pub seconds: u64,
    /// With --time-wait: connections per second asked for.
    #[arg(long, default_value_t = 2000.0, requires = "time_wait")]
    pub rate: f64,
    /// Internal: serve the echo protocol on [::]:PORT (run inside the namespace).
    #[arg(long, hide = true, value_name = "PORT")]
    pub serve: Option<u16>,
    /// Internal: with --serve, also serve every port after PORT up to this one.
    #[arg(long, hide = true, value_name = "PORT")]
    pub serve_last: Option<u16>,
}

/// The upstream port of `c`'s small-message cases in `round` (from 1): a port of its own, so
/// that the forwarder's upstream sockets that another contender's client-closes-first case left
/// in TIME_WAIT (60 s) never share its ephemeral port range toward the upstream.
fn small_port(round: usize, c: Contender) -> u16 {
    let i = Contender::ALL.iter().position(|&x| x == c).unwrap_or(0);
    ECHO_PORT + 1 + ((round - 1) * Contender::ALL.len() + i) as u16
}

/// What the report says below the table: remarks in order, and the connection counts each
/// contender could not get past, one line per contender.
#[derive(Default)]
struct Notes {
    lines: Vec<String>,
    caps: Vec<(Contender, Vec<Cap>)>,
    /// Connections spliced broke (reset, or left hanging): a bug, not a slow figure. The bench
    /// still writes its report, then fails.
    spliced_broke: Vec<String>,
    /// TIME_WAIT left by each short-connection case, per contender and round.
    time_wait: Vec<(Closer, Contender, TimeWait)>,
}

impl Notes {
    /// One line per short-connection case: the TIME_WAIT sockets it left on the host, per
    /// contender, the median over the rounds.
    fn time_wait_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (how, what) in [
            (Closer::Upstream, "short conn/s (the upstream closes first)"),
            (Closer::Client, "short conn/s client closes first"),
        ] {
            let mut parts = Vec::new();
            for c in Contender::ALL {
                let tw: Vec<&TimeWait> = self
                    .time_wait
                    .iter()
                    .filter(|(h, k, _)| *h == how && *k == c)
                    .map(|(_, _, t)| t)
                    .collect();
                if tw.is_empty() {
                    continue;
                }
                let med = |f: fn(&TimeWait) -> usize| {
                    let mut v: Vec<usize> = tw.iter().map(|t| f(t)).collect();
                    v.sort_unstable();
                    report::group(v[v.len() / 2] as u64)
                };
                parts.push(format!(
                    "{} {} / {} / {}",
                    c.name(),
                    med(|t| t.upstream_side),
                    med(|t| t.client),
                    med(|t| t.forwarder_client_side)
                ));
            }
            if !parts.is_empty() {
                out.push(format!(
                    "TIME_WAIT sockets on the host that the {what} case left (growth over the \
                     case, median over the rounds): toward the upstream's port (the forwarder's \
                     upstream sockets, which hold its ephemeral ports; direct: the client's) / \
                     the client's toward the forwarder / the forwarder's accepted sockets: {}.",
                    parts.join("; ")
                ));
            }
        }
        out
    }
}

/// A contender stuck below a target: round, connections held, the target, why the next failed.
type Cap = (usize, usize, usize, String);

impl Notes {
    fn push(&mut self, line: String) {
        self.lines.push(line);
    }

    /// A remark that `c` broke connections; for spliced, also a failure of the run.
    fn broke(&mut self, c: Contender, line: String) {
        if matches!(
            c,
            Contender::Auto
                | Contender::AutoSni
                | Contender::AutoNs
                | Contender::AutoXdp
                | Contender::Sockmap
                | Contender::Splice
                | Contender::Copy
        ) {
            self.spliced_broke.push(line.clone());
        }
        self.lines.push(line);
    }

    fn cap(&mut self, c: Contender, round: usize, held: usize, target: usize, why: String) {
        let entry = match self.caps.iter().position(|(k, _)| *k == c) {
            Some(i) => &mut self.caps[i].1,
            None => {
                self.caps.push((c, Vec::new()));
                &mut self.caps.last_mut().expect("just pushed").1
            }
        };
        entry.push((round, held, target, why));
    }

    /// Every line, the TIME_WAIT and capacity ones last.
    fn lines(&self) -> Vec<String> {
        let mut out = self.lines.clone();
        out.extend(self.time_wait_lines());
        for (c, caps) in &self.caps {
            let held: Vec<String> = caps
                .iter()
                .map(|(_, n, _, _)| report::group(*n as u64))
                .collect();
            let rounds: Vec<String> = caps.iter().map(|(r, ..)| r.to_string()).collect();
            let (_, _, target, why) = &caps[0];
            out.push(format!(
                "{} could not hold {} idle connections: it held {} (rounds {}), then the next \
                 connection failed: {why}",
                c.name(),
                report::group(*target as u64),
                held.join(", "),
                rounds.join(", ")
            ));
        }
        out
    }
}

/// How much of everything.
struct Plan {
    quick: bool,
    rounds: usize,
    /// iperf3's `-t SECS` or `-n BYTES`, each way.
    iperf_amount: [&'static str; 2],
    rr_dur: Duration,
    rr_max: usize,
    /// Short connections, the upstream closing first.
    short: Amount,
    /// Short connections, the client closing first: fewer than 10,000, so the TIME_WAIT they
    /// leave (two per connection for a forwarder) stays well inside the ephemeral port range.
    client_closes: Amount,
    /// The live connection counts the ramp stops at, in order, and what is measured there.
    levels: Vec<Level>,
    probes: usize,
    open_threads: usize,
    /// `--perf DIR`.
    perf: Option<Perf>,
}

impl Plan {
    /// The profiler for cases of `round`: the first round only.
    fn perf(&self, round: usize) -> Option<&Perf> {
        self.perf.as_ref().filter(|_| round == 1)
    }
}

/// A stop of the idle-connection ramp, with the figure columns it fills.
struct Level {
    count: usize,
    /// Set-up time is probed here, into this column.
    setup_fig: Option<usize>,
    /// Memory is read here, into these columns (daemon, kernel).
    memory_figs: Option<(usize, usize)>,
}

impl Plan {
    /// `nofile`: the open-file limit every process here gets. A forwarder holds two sockets per
    /// connection, so N must fit twice under it. Where the limit is too low for forwarders that
    /// also hold two pipes per connection (6 descriptors), memory is read at a middle level
    /// too, the most those can hold, so that every contender has a memory figure.
    fn new(quick: bool, nofile: u64, notes: &mut Notes) -> Plan {
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
            probes: if quick { 30 } else { 200 },
            open_threads: 8,
            perf: None,
        }
    }
}

// Figure columns, in table order; then daemon and kernel memory for each memory level, then
// set-up time for each probe level (see `Level`).
const UP: usize = 0;
const DOWN: usize = 1;
const RR: usize = 2;
const RR_P50: usize = 3;
const RR_P99: usize = 4;
const SHORT: usize = 5;
const SHORT_CLIENT_CLOSES: usize = 6;
const DAEMON_CPU: usize = 7;
const ALL_CPU_UP: usize = 8;
const ALL_CPU_DOWN: usize = 9;
const ALL_CPU_CONN: usize = 10;
const FIRST_MEMORY: usize = 11;

fn figures(plan: &Plan) -> Vec<Figure> {
    let f = |title: String, higher_better, daemon_only| Figure {
        title,
        higher_better,
        daemon_only,
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
    ];
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

pub fn command(args: Args) -> Result<()> {
    if let Some(port) = args.serve {
        return server::serve(port, args.serve_last.unwrap_or(port));
    }
    if !is_root() {
        reexec_as_root()?;
    }
    let started = Instant::now();
    crate::setup::run()?;
    crate::setup::bench_packages()?;
    if args.perf.is_some() {
        crate::setup::perf_package()?;
    }
    let spliced = crate::build::build_spliced(true)?;
    let output = args
        .output
        .unwrap_or_else(|| workspace_root().join("docs").join("benchmarks.md"));
    let chart = output.with_extension("svg");
    if args.time_wait {
        sys::raise_nofile(1 << 20);
        topology::catch_signals();
        let params = time_wait::Params {
            spliced,
            dir: std::env::temp_dir().join(format!("spliced-bench-tw-{}", std::process::id())),
            rate: args.rate,
            dur: Duration::from_secs(args.seconds),
        };
        let result = time_wait::command(&params, &output);
        if std::env::var_os("SPLICED_BENCH_KEEP").is_none() {
            let _ = fs::remove_dir_all(&params.dir);
        }
        return result;
    }
    let mut notes = Notes::default();
    notes.lines.extend(cpu::irq_time_note());
    let nofile = sys::raise_nofile(1 << 20);
    let mut plan = Plan::new(args.quick, nofile, &mut notes);
    if let Some(n) = args.rounds {
        plan.rounds = usize::from(n);
    }
    if let Some(dir) = &args.perf {
        plan.perf = Some(Perf::new(dir)?);
        notes.push(format!(
            "Profiled with `--perf {}`: perf's sampling ran during every case of each \
             contender's first round and is in that round's figures. Without a hardware PMU \
             (as on this virtual machine) perf samples on `cpu-clock`, a timer: time spent \
             with interrupts off is charged to where they come back on \
             (`_raw_spin_unlock_irqrestore`, `handle_softirqs`), not to the work done then.",
            dir.display()
        ));
    }
    topology::catch_signals();
    topology::remove_stale()?;
    let figures = figures(&plan);
    let load_before = sys::load_average();
    let (rows, descriptions) = {
        let mut guard = Guard::create()?;
        measure(&mut guard, &spliced, &plan, &figures, &mut notes)?
    };
    notes.push(format!(
        "Load average (1 min): {load_before} before the run, {} after it, on {} cores (the bench \
         itself adds about 1)",
        sys::load_average(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    let cells = report::cells(&figures, &rows);
    if let Some(line) = sni_note(&figures, &rows, &cells) {
        notes.push(line);
    }
    if let Some(line) = front_cost::note(&figures, &rows, &cells) {
        notes.push(line);
    }
    let table = report::table(&figures, &rows, &cells);
    let machine = sys::machine();
    let date = report::today();
    let chart_name = chart.file_name().map_or("benchmarks.svg".into(), |n| {
        n.to_string_lossy().into_owned()
    });
    let kept = fs::read_to_string(&output).unwrap_or_default();
    let md = document(
        &plan,
        &table,
        &machine,
        &date,
        &chart_name,
        &descriptions,
        &rows,
        &notes.lines(),
    );
    // The --time-wait case's section stays until that case runs again.
    let goal = [
        UP,
        DOWN,
        RR,
        SHORT,
        SHORT_CLIENT_CLOSES,
        ALL_CPU_UP,
        ALL_CPU_DOWN,
        ALL_CPU_CONN,
    ];
    let md = match verdict::section(&figures, &rows, &goal) {
        Some(section) => verdict::insert(&md, &section),
        None => md,
    };
    let md = match time_wait::kept_section(&kept) {
        Some(section) => time_wait::replace_section(&md, section),
        None => md,
    };
    let subtitle = format!(
        "{date}; {machine}; medians of {} rounds{}",
        plan.rounds,
        if plan.quick { " (--quick)" } else { "" }
    );
    let svg = chart::svg(&figures, &rows, &cells, &subtitle);
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::write(&output, &md).with_context(|| format!("cannot write {}", output.display()))?;
    fs::write(&chart, &svg).with_context(|| format!("cannot write {}", chart.display()))?;
    println!("{table}");
    for n in notes.lines() {
        println!("- {n}");
    }
    eprintln!(
        "bench: wrote {} and {} in {:.0} s",
        output.display(),
        chart.display(),
        started.elapsed().as_secs_f64()
    );
    let written = fs::read_to_string(&output)?;
    validate(&written).with_context(|| format!("{} is malformed", output.display()))?;
    if !notes.spliced_broke.is_empty() {
        bail!(
            "spliced broke connections (every one must end cleanly):\n- {}",
            notes.spliced_broke.join("\n- ")
        );
    }
    Ok(())
}

/// The SNI route against the plain one, from the table's medians: the set-up time each way
/// and the ratios of the other figures issue 12 asks about.
fn sni_note(figures: &[Figure], rows: &[Row], cells: &[Vec<report::Cell>]) -> Option<String> {
    let find = |c| rows.iter().position(|r: &Row| r.contender == c);
    let (plain, sni) = (find(Contender::Auto)?, find(Contender::AutoSni)?);
    let mut parts = Vec::new();
    for (i, f) in figures.iter().enumerate() {
        let (report::Cell::Value { v: x, .. }, report::Cell::Value { v: y, .. }) =
            (&cells[plain][i], &cells[sni][i])
        else {
            continue;
        };
        if f.title.starts_with("set-up") {
            parts.push(format!(
                "{} {} against {} ({:+.0} µs per connection)",
                f.title,
                report::number(*y),
                report::number(*x),
                y - x
            ));
        } else if ["upload", "download", "short conn/s", "all tasks"]
            .iter()
            .any(|p| f.title.starts_with(p))
            && *x > 0.0
        {
            parts.push(format!("{} {:.2}×", f.title, y / x));
        }
    }
    (!parts.is_empty()).then(|| {
        format!(
            "SNI route against plain route (`spliced auto (SNI route)` against `spliced auto`, \
             medians of this run): {}. After the routing decision both run the same data path; \
             the set-up difference is the peek (the ClientHello read and parsed) before the \
             dial, and its bytes written to the upstream first.",
            parts.join("; ")
        )
    })
}

/// The rows, and how each contender was run.
type Measured = (Vec<Row>, Vec<(Contender, String)>);

/// Starts the servers in the namespace, checks each contender once, runs the rounds.
fn measure(
    guard: &mut Guard,
    spliced: &Path,
    plan: &Plan,
    figures: &[Figure],
    notes: &mut Notes,
) -> Result<Measured> {
    let ifindex = guard.ifindex()?;
    let log = |name: &str| -> Result<(fs::File, fs::File)> {
        let f = fs::File::create(guard.dir.join(name))?;
        Ok((f.try_clone()?, f))
    };
    let (out, err) = log("iperf3-server.log")?;
    let mut iperf = guard.exec_in_ns("iperf3");
    iperf
        .args(["-s", "-p", &IPERF_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let iperf = Proc::spawn("the iperf3 server", &mut iperf)?;
    let iperf_pid = iperf.pid();
    guard.procs.push(iperf);
    let exe = std::env::current_exe().context("cannot find the xtask binary")?;
    let (out, err) = log("echo-server.log")?;
    let mut echo = guard.exec_in_ns(&exe);
    let last = small_port(plan.rounds, Contender::ALL[Contender::ALL.len() - 1]);
    echo.args(["bench", "--serve", &ECHO_PORT.to_string()])
        .args(["--serve-last", &last.to_string()])
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(err);
    let echo = Proc::spawn("the echo server", &mut echo)?;
    let echo_pid = echo.pid();
    guard.procs.push(echo);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(contenders::listening(Some(iperf_pid), IPERF_PORT)
        && contenders::listening(Some(echo_pid), ECHO_PORT)
        && contenders::listening(Some(echo_pid), last))
    {
        check_stop()?;
        for p in &mut guard.procs {
            p.check_alive()?;
        }
        if Instant::now() > deadline {
            bail!("the servers in the namespace do not listen after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let proxyd = [
        "/lib/systemd/systemd-socket-proxyd",
        "/usr/lib/systemd/systemd-socket-proxyd",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("/lib/systemd/systemd-socket-proxyd"));
    let guard: &Guard = guard;
    let mut env = Env {
        guard,
        spliced,
        ifindex,
        proxyd: &proxyd,
        proxyd_form: ProxydForm::Bracketed,
    };
    client::quit(client::greet(Target::plain(env.upstream_addr(ECHO_PORT)))?.0)
        .context("the echo server does not answer at fe80::2")?;

    let mut rows: Vec<Row> = Contender::ALL
        .iter()
        .map(|&c| Row {
            contender: c,
            skipped: None,
            samples: vec![Vec::new(); figures.len()],
        })
        .collect();
    for row in &mut rows {
        if let Err(e) = preflight(row.contender, &mut env, notes) {
            check_stop()?;
            let why = format!("{e:#}");
            notes.push(format!("{} skipped: {why}", row.contender.name()));
            row.skipped = Some(why);
        }
    }

    for round in 1..=plan.rounds {
        for row in rows.iter_mut().filter(|r| r.skipped.is_none()) {
            let c = row.contender;
            let t0 = Instant::now();
            let tag = format!("r{round}");
            if let Err(e) = bulk_round(c, &env, plan, round, &mut row.samples) {
                check_stop()?;
                notes.push(format!(
                    "{}, round {round}, iperf3: {}",
                    c.name(),
                    short_error(&e)
                ));
            }
            let t1 = Instant::now();
            small_round(c, &env, plan, &tag, round, &mut row.samples, notes)?;
            eprintln!(
                "bench: round {round}/{}: {}: bulk {:.1} s, small messages {:.1} s",
                plan.rounds,
                c.name(),
                (t1 - t0).as_secs_f64(),
                t1.elapsed().as_secs_f64()
            );
        }
    }
    let descriptions = Contender::ALL
        .iter()
        .map(|&c| (c, contenders::describe(c, env.proxyd_form)))
        .collect();
    Ok((rows, descriptions))
}

/// The first line of an error chain and its causes, cut to a readable length.
fn short_error(e: &anyhow::Error) -> String {
    let s = format!("{e:#}").replace('\n', " ");
    if s.chars().count() > 400 {
        format!("{}…", s.chars().take(400).collect::<String>())
    } else {
        s
    }
}

/// Starts `c` once and passes a connection through it. systemd-socket-proxyd is tried with the
/// bracketed `[fe80::2%IF]:PORT` first, then with `fe80::2%IF:PORT`.
fn preflight(c: Contender, env: &mut Env, notes: &mut Notes) -> Result<()> {
    if c == Contender::Direct {
        return Ok(());
    }
    let attempt = |env: &Env| -> Result<()> {
        let mut inst = contenders::start(c, env, ECHO_PORT, "preflight")?;
        let r = client::greet(inst.target()).and_then(|(s, _)| client::quit(s));
        r.with_context(|| contenders::log_tail(inst.log.as_deref()))?;
        inst.check_alive()
    };
    match attempt(env) {
        Ok(()) => Ok(()),
        Err(e) if c == Contender::Proxyd => {
            check_stop()?;
            env.proxyd_form = ProxydForm::Bare;
            attempt(env).with_context(|| {
                format!(
                    "with [fe80::2%IF]:PORT: {}; with fe80::2%IF:PORT",
                    short_error(&e)
                )
            })?;
            notes.push(format!(
                "systemd-socket-proxyd does not take the bracketed `[fe80::2%IF]:PORT` \
                 ({}); it does take the zone as `fe80::2%IF:PORT` (it splits host and port at \
                 the last colon and resolves the host with getaddrinfo), which is what was \
                 measured.",
                short_error(&e)
            ));
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Upload, download and their CPU cost through a fresh instance.
fn bulk_round(
    c: Contender,
    env: &Env,
    plan: &Plan,
    round: usize,
    samples: &mut [Vec<Sample>],
) -> Result<()> {
    let mut inst = contenders::start(c, env, IPERF_PORT, &format!("r{round}-bulk"))?;
    let tag = format!("{}-r{round}", c.slug());
    let b = bulk::measure(
        &mut inst,
        &plan.iperf_amount,
        &env.guard.dir,
        &tag,
        plan.perf(round),
    )
    .with_context(|| contenders::log_tail(inst.log.as_deref()))?;
    samples[UP].push(Sample::Value(b.up_gbps));
    samples[DOWN].push(Sample::Value(b.down_gbps));
    if let Some(cpu) = b.daemon_cpu_per_gb {
        samples[DAEMON_CPU].push(Sample::Value(cpu));
    }
    samples[ALL_CPU_UP].push(Sample::Value(b.all_cpu_per_gb[0]));
    samples[ALL_CPU_DOWN].push(Sample::Value(b.all_cpu_per_gb[1]));
    Ok(())
}

/// On a fresh instance in front of the echo server: idle connections and set-up probes, round
/// trips, short connections. A failure fails its figures for this round, noted; Ctrl-C fails
/// the whole bench.
fn small_round(
    c: Contender,
    env: &Env,
    plan: &Plan,
    tag: &str,
    round: usize,
    samples: &mut [Vec<Sample>],
    notes: &mut Notes,
) -> Result<()> {
    let note = |notes: &mut Notes, what: &str, e: &anyhow::Error| {
        notes.push(format!(
            "{}, round {round}, {what}: {}",
            c.name(),
            short_error(e)
        ));
    };
    let port = small_port(round, c);
    let mut inst = match contenders::start(c, env, port, &format!("{tag}-small")).and_then(|inst| {
        // Warm-up: systemd-socket-activate execs proxyd at the first connection.
        client::quit(client::greet(inst.target())?.0)?;
        Ok(inst)
    }) {
        Ok(inst) => inst,
        Err(e) => {
            check_stop()?;
            note(notes, "start", &e);
            return Ok(());
        }
    };
    let t_idle = Instant::now();
    if let Err(e) = idle_and_setup(&mut inst, plan, samples, round, c, notes) {
        check_stop()?;
        let e = e.context(contenders::log_tail(inst.log.as_deref()));
        notes.push(format!(
            "{}, round {round}, idle connections: {}",
            c.name(),
            short_error(&e)
        ));
    }
    let note = |notes: &mut Notes, what: &str, e: &anyhow::Error| {
        notes.push(format!(
            "{}, round {round}, {what}: {}",
            c.name(),
            short_error(e)
        ));
    };
    let t_rr = Instant::now();
    let name = |case: &str| format!("{}-r{round}-{case}", c.slug());
    let rr = perf::during(plan.perf(round), &name("round-trips"), inst.pid(), || {
        client::round_trips(inst.target(), 64, plan.rr_dur, plan.rr_max)
    });
    match rr {
        Ok(rt) => {
            samples[RR].push(Sample::Value(rt.per_sec));
            samples[RR_P50].push(Sample::Value(rt.p50_us));
            samples[RR_P99].push(Sample::Value(rt.p99_us));
        }
        Err(e) => {
            check_stop()?;
            note(notes, "round trips", &e);
        }
    }
    let t_short = Instant::now();
    let tw0 = TimeWait::count(&inst, port);
    let mut tw_before = tw0;
    let case = shorts::run(
        &inst,
        port,
        Closer::Upstream,
        plan.short,
        plan.perf(round),
        &name("short"),
    )?;
    eprintln!(
        "bench: round {round}: {}: short connections {:.2} s, TIME_WAIT count {:.2} s",
        c.name(),
        case.took[0].as_secs_f64(),
        case.took[1].as_secs_f64()
    );
    match case.shorts {
        Ok(shorts) => {
            samples[SHORT].push(Sample::Value(shorts.per_sec));
            if let Some(us) = case.cpu_us_per_conn {
                samples[ALL_CPU_CONN].push(Sample::Value(us));
            }
            notes
                .time_wait
                .push((Closer::Upstream, c, case.time_wait.since(tw0)));
            tw_before = case.time_wait;
            broke_some(notes, c, round, "short connections", &shorts);
        }
        Err(e) => {
            check_stop()?;
            let line = format!("{}, round {round}, short connections: {e:#}", c.name());
            notes.broke(c, line);
        }
    }
    let t_close = Instant::now();
    client_closes(c, &inst, plan, round, tw_before, samples, notes)?;
    if let Err(e) = inst.check_alive() {
        note(notes, "end of round", &e);
    }
    let t_end = Instant::now();
    drop(inst);
    eprintln!(
        "bench: round {round}: {}: idle+set-up {:.1} s, round trips {:.1} s, short {:.1} s, \
         client closes first {:.1} s, stop {:.1} s",
        c.name(),
        (t_rr - t_idle).as_secs_f64(),
        (t_short - t_rr).as_secs_f64(),
        (t_close - t_short).as_secs_f64(),
        (t_end - t_close).as_secs_f64(),
        t_end.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Notes the connections of a short-connection run that failed; spliced's fail the bench.
fn broke_some(notes: &mut Notes, c: Contender, round: usize, what: &str, s: &client::Shorts) {
    if s.failed > 0 {
        notes.broke(
            c,
            format!(
                "{}, round {round}, {what}: {} of {} failed (each stalls its client thread up \
                 to 3 s); first: {}",
                c.name(),
                s.failed,
                s.done + s.failed,
                s.first_error.as_deref().unwrap_or_default()
            ),
        );
    }
}

/// Short connections that the client closes first: the last case of the round, on the small
/// instance, whose upstream port ([`small_port`]) no other contender or round dials, so neither
/// this case nor any other meets the TIME_WAIT of another. `before`: the TIME_WAIT the earlier
/// cases left toward the instance's ports.
fn client_closes(
    c: Contender,
    inst: &Instance,
    plan: &Plan,
    round: usize,
    before: TimeWait,
    samples: &mut [Vec<Sample>],
    notes: &mut Notes,
) -> Result<()> {
    let what = "short connections, client closes first";
    let name = format!("{}-r{round}-client-closes", c.slug());
    let case = shorts::run(
        inst,
        small_port(round, c),
        Closer::Client,
        plan.client_closes,
        plan.perf(round),
        &name,
    )?;
    match case.shorts {
        Ok(shorts) => {
            samples[SHORT_CLIENT_CLOSES].push(Sample::Value(shorts.per_sec));
            let tw = case.time_wait.since(before);
            notes.time_wait.push((Closer::Client, c, tw));
            broke_some(notes, c, round, what, &shorts);
        }
        Err(e) => {
            check_stop()?;
            notes.broke(c, format!("{}, round {round}, {what}: {e:#}", c.name()));
        }
    }
    Ok(())
}

/// Ramps idle connections through the levels, probing set-up time and reading memory where the
/// plan says. A contender that cannot get past a count is `Capped` there for the levels above.
fn idle_and_setup(
    inst: &mut Instance,
    plan: &Plan,
    samples: &mut [Vec<Sample>],
    round: usize,
    c: Contender,
    notes: &mut Notes,
) -> Result<()> {
    let kernel0 = sys::kernel_memory_bytes()?;
    let mut conns = Vec::new();
    let mut capped = None;
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let mut result = Ok(());
    let has_daemon = inst.pid().is_some();
    for level in &plan.levels {
        if capped.is_none() {
            check_stop()?;
            if let Err(why) =
                client::open_idle(inst.target(), &mut conns, level.count, plan.open_threads)
            {
                check_stop()?;
                let n = conns.len();
                notes.cap(c, round, n, level.count, format!("{why:#}"));
                capped = Some(n);
            }
        }
        if let Some(n) = capped {
            if let Some(fig) = level.setup_fig {
                samples[fig].push(Sample::Capped(n));
            }
            if let Some((daemon, kernel)) = level.memory_figs {
                if has_daemon {
                    samples[daemon].push(Sample::Capped(n));
                }
                samples[kernel].push(Sample::Capped(n));
            }
            continue;
        }
        if let Some((daemon, kernel)) = level.memory_figs {
            sleep(Duration::from_millis(500))?;
            inst.check_alive()?;
            if let Some(pid) = inst.pid() {
                samples[daemon].push(Sample::Value(mib(sys::tree_pss_bytes(pid) as f64)));
            }
            let kernel1 = sys::kernel_memory_bytes()?;
            samples[kernel].push(Sample::Value(mib(kernel1 as f64 - kernel0 as f64)));
        }
        if let Some(fig) = level.setup_fig {
            match client::setup_probes(inst.target(), plan.probes) {
                Ok(p50) => samples[fig].push(Sample::Value(p50)),
                Err(e) => {
                    check_stop()?;
                    samples[fig].push(Sample::Failed);
                    result = Err(
                        e.context(format!("set-up probes at {} live connections", level.count))
                    );
                    break;
                }
            }
        }
    }
    let open = conns.len();
    let failed = client::quit_all(conns);
    if failed > 0 {
        notes.broke(
            c,
            format!(
            "{}, round {round}: closing the idle connections (QUIT, the upstream closes first), \
             {failed} of {} did not end cleanly: a reset, or no EOF within 3 s",
            c.name(),
            report::group(open as u64)
        ),
        );
    }
    result
}

/// Installed versions of the other tools, for the report.
fn versions() -> String {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Version}\n"])
        .args(["iperf3", "socat", "haproxy", "systemd"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines().collect::<Vec<_>>().join(", ")
}

/// The markdown report.
#[allow(clippy::too_many_arguments)]
fn document(
    plan: &Plan,
    table: &str,
    machine: &str,
    date: &str,
    chart: &str,
    descriptions: &[(Contender, String)],
    rows: &[Row],
    notes: &[String],
) -> String {
    let levels: Vec<String> = plan
        .levels
        .iter()
        .filter(|l| l.setup_fig.is_some())
        .map(|l| report::group(l.count as u64))
        .collect();
    let memory_levels: Vec<String> = plan
        .levels
        .iter()
        .filter(|l| l.memory_figs.is_some())
        .map(|l| report::group(l.count as u64))
        .collect();
    let n = memory_levels.join(" and ");
    let mut md = String::new();
    let _ = writeln!(md, "# spliced benchmarks\n");
    let _ = writeln!(
        md,
        "Measured by `cargo xtask bench{}` on {date}: {} rounds, contenders interleaved round by \
         round, every figure the median over the rounds.\n",
        if plan.quick { " --quick" } else { "" },
        plan.rounds
    );
    let _ = writeln!(
        md,
        "**Machine:** {machine}. A shared virtual machine: figures move from run to run, and \
         other work on it shows up in the system-wide figures. Compare contenders within one \
         table.\n"
    );
    let _ = writeln!(
        md,
        "**Versions:** spliced from this tree (release build); {}.\n",
        versions()
    );
    let _ = writeln!(
        md,
        "**Topology:** client on the host → forwarder listening on 127.0.0.1 → veth pair → \
         upstream at fe80::2 (link-local, `nodad`) in a network namespace. `direct` is the \
         client dialing `[fe80::2%IF]` itself, without a forwarder: the baseline of every \
         ratio. The two `… in the namespace` rows run spliced in the upstream's namespace \
         instead (client on the host → veth → spliced → loopback → upstream), one with the XDP \
         front on the veth's namespace end, where the clients' packets arrive, one without: \
         their ratio, in the notes, is the front's cost.\n"
    );
    let _ = writeln!(md, "![Each figure as a ratio to direct]({chart})\n");
    md.push_str(table);
    let _ = writeln!(
        md,
        "\nEach cell: the median, and in parentheses its ratio to `direct`. Higher is better for \
         Gbit/s, round trips/s and conn/s; lower is better for the rest. `n/a`: direct has no \
         daemon. `✗ max K`: the contender could not hold more than K connections (median over \
         the rounds), so the figure at that level does not exist for it.\n"
    );
    let _ = writeln!(md, "## What each figure is\n");
    let items = [
        format!(
            "**upload / download Gbit/s**: `iperf3 -c HOST -p PORT {a}` (and `-R`), one TCP \
             stream each way, as received; the iperf3 server runs in the namespace, bound to \
             `::`.",
            a = plan.iperf_amount.join(" ")
        ),
        format!(
            "**64 B round trips/s, p50, p99**: one connection, a 64-byte request echoed by the \
             upstream before the next is sent, for {:.1} s; the rate and the median and 99th \
             percentile of each round trip's time. Client and echo server are this bench's own \
             (Rust, TCP_NODELAY; the server in the namespace, started with `ip netns exec`).",
            plan.rr_dur.as_secs_f64()
        ),
        format!(
            "**short conn/s**: {} client threads, each in turn: connect, 100 bytes up, 100 back \
             (after a 1-byte greeting), the upstream closes, the client closes on its EOF; for \
             {:.1} s or {} connections. The upstream closes first so that the forwarder's \
             upstream sockets are the passive side and keep no TIME_WAIT (which would fill its \
             ephemeral ports toward the one upstream and slow every later dial); the TIME_WAIT \
             each case left is in the notes.",
            plan.short.workers,
            plan.short.dur.as_secs_f64(),
            report::group(plan.short.max as u64)
        ),
        format!(
            "**short conn/s client closes first**: the same exchange, but the client closes \
             right after the echo and the upstream closes on its EOF, as most HTTP keep-alive \
             connections end: the forwarder's upstream socket closes first and stays in \
             TIME_WAIT for 60 s. {} threads, for {:.1} s or {} connections (fewer than 10,000, \
             well inside the ephemeral port range), as the last case of the contender's round. \
             Every contender in every round runs its small-message cases against an upstream \
             port of its own (the echo server listens on one per contender and round), so no \
             case meets the TIME_WAIT another left toward its upstream.",
            plan.client_closes.workers,
            plan.client_closes.dur.as_secs_f64(),
            report::group(plan.client_closes.max as u64)
        ),
        "**daemon CPU s/GB**: user+system CPU seconds of the forwarder's processes \
         (`/proc/PID/stat` utime+stime of the process and its children, reaped ones included) \
         over the upload and the download, per GB moved (both directions)."
            .into(),
        "**all tasks CPU s/GB up / down**: the CPU time charged to every task on the machine, \
         kernel threads included (kworkers, ksoftirqd, the sockmap psock backlog workers, \
         softirq work charged to whatever task it interrupted), over the upload and, \
         separately, the download, per GB moved that way: the iperf3 client and server, the \
         forwarder and the kernel's TCP, veth, splice and sockmap work. From each process's \
         `/proc/PID/stat`: utime+stime (all its threads, live and exited) plus cutime+cstime \
         (the children it reaped), the growth from just before iperf3 starts to 0.1 s after it \
         ends; a process born in the window counts whole, one that exited counts through its \
         parent's cutime+cstime, less what it had at the start. Lost: the in-window CPU of \
         kernel threads that exited in the window (a retiring kworker), of processes no \
         parent waits for, and softirq work done on an idle CPU (charged to the idle task, \
         pid 0, which /proc does not list; on a busy machine CPUs are seldom idle). Not \
         `/proc/stat` busy time, which is unreliable on these virtual machines. Resolution: \
         one clock tick (10 ms) per process; other work on the machine (other users' builds \
         and tests) is counted too, which the medians damp but do not remove."
            .into(),
        "**all tasks CPU µs per conn**: the same count over the short-connection run (the \
         upstream closes first), per connection: client, forwarder, upstream and kernel."
            .into(),
        format!(
            "**daemon MiB @K idle** (K = {n}): the forwarder's memory with K idle connections \
             open through it (each greeted, so it reaches the upstream): proportional set size summed over its processes \
             (`/proc/PID/smaps_rollup`), which is the RSS of a single process less its share of \
             shared libraries, and does not count socat's shared pages once per fork."
        ),
        "**kernel MiB @K idle**: growth of kernel memory from before the first idle \
             connection to K idle connections: `Slab` + `KernelStack` + `PageTables` of \
             `/proc/meminfo` plus TCP's buffer pages (`/proc/net/sockstat` `mem`), less the \
             pages of the TIME_WAIT socket slabs (`tw_sock_TCP`, `tw_sock_TCPv6` in \
             `/proc/slabinfo`), which the short-connection cases of earlier contenders leave \
             and which expire 60 s later, during someone else's ramp. It includes both ends of \
             every connection (the client's and the upstream's sockets), so direct's figure is \
             the floor. Other work on the machine moves it by a few MiB either way (it can come \
             out below zero when the growth is small)."
            .into(),
        format!(
            "**set-up µs @K live**: with K idle connections open through the contender, {} \
             connections one after the other, each timed from `connect()` to the first byte, a \
             greeting the upstream sends on accept (so the forwarder's accept, its dial and its \
             splice set-up are all inside); the median. For the SNI route the client writes its \
             ClientHello right after `connect()`, inside the time: that route dials the upstream \
             only once it has read and parsed it. Levels: {}.",
            plan.probes,
            levels.join(", ")
        ),
    ];
    for i in items {
        let _ = writeln!(md, "- {i}");
    }
    let _ = writeln!(md, "\n## Contenders\n");
    for (c, d) in descriptions {
        let _ = writeln!(md, "- **{}**: {d}", c.name());
    }
    let _ = writeln!(md, "\n## Notes\n");
    let skipped: Vec<&Row> = rows.iter().filter(|r| r.skipped.is_some()).collect();
    if notes.is_empty() && skipped.is_empty() {
        let _ = writeln!(md, "- Every contender ran every round without an error.");
    }
    for note in notes {
        let _ = writeln!(md, "- {note}");
    }
    md
}
