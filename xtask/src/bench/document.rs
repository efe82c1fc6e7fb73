//! The markdown report: how it was measured, the table, what each figure is, the contenders
//! and the notes.
use std::{fmt::Write as _, process::Command};

use super::{
    client,
    contenders::Contender,
    plan::Plan,
    report::{self, Row},
};

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

/// What the markdown report is made of.
pub struct Document<'a> {
    pub plan: &'a Plan,
    /// The markdown table.
    pub table: &'a str,
    pub machine: &'a str,
    pub date: &'a str,
    /// The commit spliced was built from (`+`: with uncommitted changes).
    pub commit: &'a str,
    /// The chart's file name (it sits beside the report).
    pub chart: &'a str,
    /// How each contender was run.
    pub descriptions: &'a [(Contender, String)],
    pub rows: &'a [Row],
    pub notes: &'a [String],
    /// `auto` against the field (`verdict::section`), after the table, if there is one.
    pub verdict: Option<&'a str>,
}

impl Document<'_> {
    /// The markdown report.
    pub fn render(&self) -> String {
        let mut md = String::new();
        self.head(&mut md);
        if let Some(verdict) = self.verdict {
            let _ = writeln!(md, "{verdict}");
        }
        let _ = writeln!(md, "## What each figure is\n");
        for i in traffic_items(self.plan)
            .into_iter()
            .chain(cost_items(self.plan))
        {
            let _ = writeln!(md, "- {i}");
        }
        self.tail(&mut md);
        md
    }

    /// The title, how and where it was measured, the chart and the table.
    fn head(&self, md: &mut String) {
        let (plan, machine, date, chart) = (self.plan, self.machine, self.date, self.chart);
        let _ = writeln!(md, "# spliced benchmarks\n");
        let _ = writeln!(
        md,
        "Measured by `cargo xtask bench{}` on {date}: {} rounds, contenders interleaved round by \
         round (each round in its own order: every k-th contender of the table, k differing from \
         round to round, so none always follows the same one) and, for the round trips, \
         connection by connection; every figure the median over the rounds.\n",
        plan.flags(),
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
            "**Versions:** spliced from this tree at commit {} (release build); {}.\n",
            self.commit,
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
        md.push_str(self.table);
        let _ = writeln!(
        md,
        "\nEach cell: the median, and in parentheses its ratio to `direct`. Higher is better for \
         Gbit/s, round trips/s and conn/s; lower is better for the rest. `n/a`: direct has no \
         daemon. `✗ max K`: the contender could not hold more than K connections (median over \
         the rounds), so the figure at that level does not exist for it. `not run`: the run \
         left that case out (`--no-bulk`).\n"
    );
    }

    /// Where the profiles are, the contenders and the notes.
    fn tail(&self, md: &mut String) {
        let _ = writeln!(md, "\n## Profiles\n\n{PROFILES}");
        let _ = writeln!(md, "\n## Contenders\n");
        for (c, d) in self.descriptions {
            let _ = writeln!(md, "- **{}**: {d}", c.name());
        }
        let _ = writeln!(md, "\n## Notes\n");
        let skipped: Vec<&Row> = self.rows.iter().filter(|r| r.skipped.is_some()).collect();
        if self.notes.is_empty() && skipped.is_empty() {
            let _ = writeln!(md, "- Every contender ran every round without an error.");
        }
        for note in self.notes {
            let _ = writeln!(md, "- {note}");
        }
    }
}

/// Where the profiles' findings are kept: a file a run does not overwrite.
const PROFILES: &str = "Why the figures are what they are, from `perf record -g` of the forwarder \
     and of the whole machine during each case (`cargo xtask bench --perf DIR` profiles each \
     contender's first round) and from side-by-side runs, is kept in \
     [docs/profiles.md](profiles.md), which a run does not overwrite: the short connections (the \
     accept and dial path, and the pinned lanes that keep a connection's wake-ups on one core), \
     the round trips (when a connection leaves the copy path, and the floor a cross-core \
     wake-up sets, whose cost on this machine the notes give), bulk transfers (splice against \
     sockmap, one thread per transfer) and the XDP front's cost.";

/// What the throughput, round-trip and short-connection figures are.
fn traffic_items(plan: &Plan) -> [String; 4] {
    [
        format!(
            "**upload / download Gbit/s**: `iperf3 -c HOST -p PORT {a}` (and `-R`), one TCP \
             stream each way, as received; the iperf3 server runs in the namespace, bound to \
             `::`.",
            a = plan.iperf_amount.join(" ")
        ),
        format!(
            "**64 B round trips/s, p50, p99**: a 64-byte request echoed by the upstream before \
             the next is sent, on {} connections per contender and round, {:.2} s each (one \
             connection's rate here varies 2-3x with the cores its client and forwarder land \
             on; new connections land anew); the rate over all of them and the median and 99th \
             percentile of each round trip's time. The case opens each round with every \
             contender's instance up at once, their connections taken in turns (one of each \
             contender's, in an order of its own, then the next), so that what the shared \
             machine does meanwhile falls on all alike; `spliced auto + XDP in the namespace` is \
             started for each of its turns and stopped after it (its XDP program on the veth \
             would sit in the others' path), and a `--perf` round runs each contender's \
             connections in one turn. Client and echo server are this bench's own (Rust, TCP_NODELAY; the server \
             in the namespace, started with `ip netns exec`). The notes give what a wake-up \
             across cores costs on the machine and how many each contender's round trip took.",
            client::RT_CONNECTIONS,
            plan.rr_dur.as_secs_f64() / client::RT_CONNECTIONS as f64
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
    ]
}

/// What the CPU, memory and set-up figures are (memory and set-up only where the run ramped
/// idle connections).
fn cost_items(plan: &Plan) -> Vec<String> {
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
    let mut items: Vec<String> = vec![
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
        "**all tasks CPU µs per round trip**: the same count over the round trips (their \
         connections' set-up included), per round trip: client, forwarder, upstream and kernel."
            .into(),
    ];
    if plan.levels.is_empty() {
        return items;
    }
    items.extend([
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
    ]);
    items
}
