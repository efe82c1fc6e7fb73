//! `cargo xtask bench [--quick] [--output FILE] [--perf DIR]`: spliced's data paths (and its
//! SNI-routed route) against a direct connection, socat, HAProxy and systemd-socket-proxyd, on
//! the situation spliced is for: a client on the host, a forwarder on 127.0.0.1, an upstream at
//! an IPv6 link-local address (fe80::2, `nodad`) in a network namespace behind a veth pair.
//!
//! Every round starts with 64-byte round trips (and every task's CPU per round trip): every
//! contender's instance up at once, their connections taken in turns (`round_trips`). Then the
//! contenders one after another (each round in its own order, see `order::round_order`): an
//! upload and a download with iperf3 (and the CPU they cost, the forwarder's and every task's on
//! the machine), then, on a fresh forwarder in front of an upstream port of its own, idle
//! connections ramped to 100, 1,000 and N with set-up probes at each level and memory at N,
//! short connections the upstream closes first (their rate and every task's CPU per
//! connection), and short connections the client closes first. Every figure is the median over
//! the rounds. The report goes
//! to `docs/benchmarks.md` with a chart in `docs/benchmarks.svg`, and the table to stdout; the
//! table is parsed back and checked before the command succeeds.
mod bulk;
mod chart;
mod client;
mod contenders;
mod cpu;
mod document;
mod front_cost;
mod hello;
mod idle;
mod measure;
mod notes;
mod order;
mod perf;
mod plan;
mod report;
mod round;
mod round_trips;
mod server;
mod shorts;
mod sni_cost;
mod sys;
mod time_wait;
mod topology;
mod verdict;
mod wakeups;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use self::{
    contenders::Contender,
    document::Document,
    measure::{measure, Measured},
    notes::Notes,
    perf::Perf,
    plan::{
        Plan, ALL_CPU_CONN, ALL_CPU_DOWN, ALL_CPU_UP, DOWN, RR, SHORT, SHORT_CLIENT_CLOSES, UP,
    },
    report::Figure,
    topology::Guard,
};
use crate::util::{is_root, reexec_as_root, workspace_root};

pub use report::validate;

#[derive(clap::Args)]
pub struct Args {
    /// A short run (about 2 minutes on an idle machine; CI runs it): 3 rounds, 128 MiB iperf3
    /// runs each way, 500 idle connections, well under a second per small-message case.
    #[arg(long)]
    pub quick: bool,
    /// Rounds instead of the default (5, or 3 with --quick); every figure is the median over
    /// them.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=40))]
    pub rounds: Option<u16>,
    /// Only this contender (repeatable; `direct`, the baseline, and `auto` always run): for a
    /// run of many rounds on the few rows a question is about. Needs --output: such a run does
    /// not replace the full report.
    #[arg(long = "contender", value_name = "NAME", value_enum)]
    pub contenders: Vec<Contender>,
    /// Leave out the idle-connection ramp (memory and set-up time at each level), the longest
    /// case of a round. Needs --output, as --contender.
    #[arg(long)]
    pub no_idle: bool,
    /// Leave out the bulk cases (iperf3 up and down): the small-message cases alone, for many
    /// rounds of them in little time. Needs --output, as --contender.
    #[arg(long)]
    pub no_bulk: bool,
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

/// The bench: `--serve` (the echo server, inside the namespace), `--time-wait`, or the figures.
pub fn command(args: Args) -> Result<()> {
    if let Some(port) = args.serve {
        return server::serve(port, args.serve_last.unwrap_or(port));
    }
    // Before the re-exec, so that a bad command line fails without asking for root.
    if (!args.contenders.is_empty() || args.no_idle || args.no_bulk) && args.output.is_none() {
        bail!(
            "--contender, --no-idle and --no-bulk measure part of the table, which would replace the full \
             report (docs/benchmarks.md): give --output FILE, e.g. --output /tmp/bench.md"
        );
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
    // Taken with the build, so that a commit made during the run does not name it.
    let commit = sys::commit();
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| workspace_root().join("docs").join("benchmarks.md"));
    if args.time_wait {
        return time_wait_only(spliced, &output, args.rate, args.seconds);
    }
    let mut notes = Notes::default();
    notes.lines.extend(cpu::irq_time_note());
    notes.lines.extend(wakeups::cost_note());
    let plan = plan(&args, &mut notes)?;
    topology::catch_signals();
    topology::remove_stale()?;
    let figures = plan::figures(&plan);
    let load_before = sys::load_average();
    let measured = {
        let mut guard = Guard::create()?;
        measure(&mut guard, &spliced, &plan, &figures, &mut notes)?
    };
    notes.push(format!(
        "Load average (1 min): {load_before} before the run, {} after it, on {} cores (the bench \
         itself adds about 1)",
        sys::load_average(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    let report = render(&plan, &figures, &measured, &mut notes, (&output, &commit));
    write(&output, &report, &notes, (started, &plan.contenders))?;
    if !notes.spliced_broke.is_empty() {
        bail!(
            "spliced broke connections (every one must end cleanly):\n- {}",
            notes.spliced_broke.join("\n- ")
        );
    }
    Ok(())
}

/// `--time-wait`: its own case and its own section of the report at `output`.
fn time_wait_only(spliced: PathBuf, output: &Path, rate: f64, seconds: u64) -> Result<()> {
    sys::raise_nofile(1 << 20);
    topology::catch_signals();
    let params = time_wait::Params {
        spliced,
        dir: std::env::temp_dir().join(format!("spliced-bench-tw-{}", std::process::id())),
        rate,
        dur: Duration::from_secs(seconds),
    };
    let result = time_wait::command(&params, output);
    if std::env::var_os("SPLICED_BENCH_KEEP").is_none() {
        let _ = fs::remove_dir_all(&params.dir);
    }
    result
}

/// The plan for `args` under this process's open-file limit (raised as far as it goes).
fn plan(args: &Args, notes: &mut Notes) -> Result<Plan> {
    let nofile = sys::raise_nofile(1 << 20);
    // Plan::new's notes are about the idle levels, which --no-idle leaves out.
    let mut idle_notes = Notes::default();
    let mut plan = Plan::new(args.quick, nofile, &mut idle_notes);
    if !args.no_idle {
        notes.lines.append(&mut idle_notes.lines);
    }
    if let Some(n) = args.rounds {
        plan.rounds = usize::from(n);
    }
    if !args.contenders.is_empty() {
        plan.contenders
            .retain(|c| c.always_runs() || args.contenders.contains(c));
    }
    if args.no_idle {
        plan.levels.clear();
    }
    plan.bulk = !args.no_bulk;
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
    Ok(plan)
}

/// The report in its three forms.
struct Report {
    /// The markdown table, for stdout.
    table: String,
    /// The whole markdown report.
    md: String,
    /// The chart.
    svg: String,
}

/// The table, the markdown report (the notes that compare rows added first) and the chart.
/// `output`'s current `--time-wait` section is kept; `commit` is what spliced was built from.
fn render(
    plan: &Plan,
    figures: &[Figure],
    (rows, descriptions): &Measured,
    notes: &mut Notes,
    (output, commit): (&Path, &str),
) -> Report {
    let cells = report::cells(figures, rows);
    if let Some(line) = sni_cost::note(figures, rows, &cells) {
        notes.push(line);
    }
    if let Some(line) = front_cost::note(figures, rows, &cells) {
        notes.push(line);
    }
    let table = report::table(figures, rows, &cells);
    let machine = sys::machine();
    let date = report::today();
    let chart_name = chart_path(output)
        .file_name()
        .map_or("benchmarks.svg".into(), |n| {
            n.to_string_lossy().into_owned()
        });
    let kept = fs::read_to_string(output).unwrap_or_default();
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
    let verdict = verdict::section(figures, rows, &goal);
    let md = Document {
        plan,
        table: &table,
        machine: &machine,
        date: &date,
        commit,
        chart: &chart_name,
        descriptions,
        rows,
        notes: &notes.lines(),
        verdict: verdict.as_deref(),
    }
    .render();
    // The --time-wait case's section stays until that case runs again.
    let md = match time_wait::kept_section(&kept) {
        Some(section) => time_wait::replace_section(&md, section),
        None => md,
    };
    let subtitle = format!(
        "{date}; {machine}; medians of {} rounds{}",
        plan.rounds,
        if plan.quick { " (--quick)" } else { "" }
    );
    let svg = chart::svg(figures, rows, &cells, &subtitle);
    Report { table, md, svg }
}

/// The chart beside the report: same name, .svg.
fn chart_path(output: &Path) -> PathBuf {
    output.with_extension("svg")
}

/// Writes the report and the chart, prints the table and the notes, and checks the report
/// as written.
fn write(
    output: &Path,
    report: &Report,
    notes: &Notes,
    (started, contenders): (Instant, &[Contender]),
) -> Result<()> {
    let chart = chart_path(output);
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::write(output, &report.md).with_context(|| format!("cannot write {}", output.display()))?;
    fs::write(&chart, &report.svg).with_context(|| format!("cannot write {}", chart.display()))?;
    println!("{}", report.table);
    for n in notes.lines() {
        println!("- {n}");
    }
    eprintln!(
        "bench: wrote {} and {} in {:.0} s",
        output.display(),
        chart.display(),
        started.elapsed().as_secs_f64()
    );
    let written = fs::read_to_string(output)?;
    report::validate_rows(&written, contenders)
        .with_context(|| format!("{} is malformed", output.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{plan, Args, Contender, Notes};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn contender_picks_rows_and_no_idle_and_no_bulk_drop_cases() {
        let argv = [
            "bench",
            "--contender",
            "haproxy",
            "--contender",
            "proxyd",
            "--no-idle",
            "--no-bulk",
            "--rounds",
            "30",
        ];
        let plan = plan_of(&argv);
        assert_eq!(
            plan.contenders,
            [
                Contender::Direct,
                Contender::Auto,
                Contender::Haproxy,
                Contender::Proxyd
            ]
        );
        assert!(plan.levels.is_empty());
        assert!(!plan.bulk);
        assert_eq!(plan.rounds, 30);
        assert_eq!(
            plan.flags(),
            " --contender haproxy --contender proxyd --no-idle --no-bulk"
        );
        let err = Cli::try_parse_from(["bench", "--contender", "nginx"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("nginx") && err.contains("haproxy"), "{err}");
        let full = plan_of(&["bench"]);
        assert_eq!(full.contenders, Contender::ALL);
        assert!(full.bulk);
        assert_eq!(full.flags(), "");
    }

    fn plan_of(argv: &[&str]) -> super::Plan {
        plan(
            &Cli::try_parse_from(argv).unwrap().args,
            &mut Notes::default(),
        )
        .unwrap()
    }
}
