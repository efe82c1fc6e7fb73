//! `cargo xtask bench --time-wait [--seconds N] [--rate R]`: sustained short connections to one
//! upstream where the *client* closes first, so each forwarder's side of its upstream
//! connections ends in TIME_WAIT (issue 17). Not part of the quick bench or CI: a run takes
//! about 4 × N seconds.
//!
//! Each run gets a world of its own, so no TIME_WAIT entry of one run counts in the next: a
//! namespace `sptw<pid>f<i>` holding the forwarder and the client, and `sptw<pid>u<i>` holding
//! the bench's echo server, joined by a veth pair (`fe80::1` / `fe80::2`, `nodad`); the
//! forwarder dials `[fe80::2%IF]:7000`, as in the main bench. `net.ipv4.tcp_tw_reuse` is set in
//! the forwarder's namespace only (it is per namespace): the host's sysctls are never touched.
//! The client paces `rate` connections a second over 4 threads (each thread waits for its
//! connection, so a slow forwarder gets fewer), each: connect to 127.0.0.1, the greeting, 100
//! bytes echoed, close. Runs, in order: spliced auto and HAProxy with `tcp_tw_reuse=2` (the
//! default: loopback only), then both with `tcp_tw_reuse=1` (the fix spliced's warning gives).
use std::{
    fmt::Write as _,
    fs::{self, File},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    client::percentile,
    contenders::{free_port, haproxy_config, listening, log_tail},
    plan::ECHO_PORT,
    report::{group, today},
    server::GREETING,
    sys,
    topology::{check_stop, Proc, STOP},
};
use crate::util::run;

/// The client's threads (the C client used 4).
const THREADS: usize = 4;
/// One connect or read longer than this counts the connection as failed.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// The marker around this case's section of the report, so the main bench keeps it.
pub const BEGIN: &str = "<!-- time-wait: written by `cargo xtask bench --time-wait` -->";
pub const END: &str = "<!-- /time-wait -->";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Forwarder {
    Spliced,
    Haproxy,
}

impl Forwarder {
    fn name(self) -> &'static str {
        match self {
            Forwarder::Spliced => "spliced auto",
            Forwarder::Haproxy => "HAProxy",
        }
    }
}

/// One run's figures.
struct Outcome {
    forwarder: Forwarder,
    tw_reuse: u8,
    done: usize,
    failed: usize,
    secs: f64,
    /// Connections per second in the last half of the run (the steady state).
    late_rate: f64,
    late_p50_us: f64,
    late_p99_us: f64,
    /// The first whole second (from second 1) whose connections fell below 90% of the rate
    /// asked for.
    first_slow_second: Option<usize>,
    time_wait: u64,
    cpu_us_per_conn: f64,
    /// spliced's warning, if it gave one.
    warned: Option<String>,
}

/// The two namespaces of one run, removed on drop (the veth goes with them).
struct World {
    fwd: String,
    up: String,
    /// The forwarder's side of the veth: the zone of fe80::2.
    fwd_if: String,
    dir: PathBuf,
    procs: Vec<Proc>,
}

impl World {
    fn create(i: usize, dir: &Path) -> Result<World> {
        let pid = std::process::id();
        let mut w = World {
            fwd: format!("sptw{pid}f{i}"),
            up: format!("sptw{pid}u{i}"),
            fwd_if: format!("tw{pid}f{i}"),
            dir: dir.to_path_buf(),
            procs: Vec::new(),
        };
        run(Command::new("ip").args(["netns", "add", &w.fwd]))?;
        if let Err(e) = run(Command::new("ip").args(["netns", "add", &w.up])) {
            w.up.clear();
            return Err(e);
        }
        let peer = format!("tw{pid}u{i}");
        let (f, u) = (w.fwd.as_str(), w.up.as_str());
        let steps: &[&[&str]] = &[
            &[
                "-n", f, "link", "add", &w.fwd_if, "type", "veth", "peer", "name", &peer, "netns",
                u,
            ],
            &[
                "-n",
                f,
                "addr",
                "add",
                "fe80::1/64",
                "dev",
                &w.fwd_if,
                "nodad",
            ],
            &["-n", f, "link", "set", &w.fwd_if, "up"],
            &["-n", f, "link", "set", "lo", "up"],
            &["-n", u, "addr", "add", "fe80::2/64", "dev", &peer, "nodad"],
            &["-n", u, "link", "set", &peer, "up"],
            &["-n", u, "link", "set", "lo", "up"],
        ];
        for args in steps {
            run(Command::new("ip").args(*args))?;
        }
        Ok(w)
    }

    fn exec_in(&self, netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns]).arg(program);
        cmd
    }

    fn sysctl(&self, setting: &str) -> Result<()> {
        run(self
            .exec_in(&self.fwd, "sysctl")
            .args(["-qw", setting])
            .stdout(Stdio::null()))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.procs.clear();
        for ns in [&self.fwd, &self.up].into_iter().filter(|n| !n.is_empty()) {
            if let Err(e) = run(Command::new("ip").args(["netns", "delete", ns])) {
                eprintln!("bench: cleanup: {e:#}; remove it with `ip netns delete {ns}`");
            }
        }
    }
}

/// Waits (10 s at most) until `pid`'s namespace has a listener on `port`.
fn wait_listening(proc: &mut Proc, port: u16, log: Option<&Path>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening(Some(proc.pid()), port) {
        check_stop()?;
        proc.check_alive().with_context(|| log_tail(log))?;
        if Instant::now() > deadline {
            bail!(
                "{} does not listen on {port} after 10 s; {}",
                proc.what,
                log_tail(log)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Starts the echo server in the upstream namespace and `forwarder` in the other; returns the
/// forwarder's port and log.
fn start(w: &mut World, forwarder: Forwarder, spliced: &Path, tag: &str) -> Result<(u16, PathBuf)> {
    let exe = std::env::current_exe().context("cannot find the xtask binary")?;
    let echo_log = File::create(w.dir.join(format!("echo-{tag}.log")))?;
    let mut echo = w.exec_in(&w.up, &exe);
    echo.args(["bench", "--serve", &ECHO_PORT.to_string()])
        .stdin(Stdio::piped())
        .stdout(echo_log.try_clone()?)
        .stderr(echo_log);
    let mut echo = Proc::spawn("the echo server", &mut echo)?;
    wait_listening(&mut echo, ECHO_PORT, None)?;
    w.procs.push(echo);
    let port = free_port()?;
    let log = w.dir.join(format!("forwarder-{tag}.log"));
    let (iface, up) = (&w.fwd_if, ECHO_PORT);
    let mut cmd = match forwarder {
        Forwarder::Spliced => {
            let config = w.dir.join(format!("spliced-{tag}.toml"));
            // A control socket of its own: the default path may be another daemon's.
            let control = w.dir.join(format!("control-{tag}.sock"));
            fs::write(
                &config,
                format!(
                    "mode = \"auto\"\ngrace_period = \"0s\"\nmax_connections = 100000\n\
                     control_socket = \"{}\"\n\n\
                     [[route]]\nname = \"bench\"\nlisten = \"127.0.0.1:{port}\"\n\
                     upstream = \"[fe80::2%{iface}]:{up}\"\n",
                    control.display()
                ),
            )?;
            let mut cmd = w.exec_in(&w.fwd, spliced);
            cmd.arg("--config").arg(&config).env("RUST_LOG", "info");
            cmd
        }
        Forwarder::Haproxy => {
            let config = w.dir.join(format!("haproxy-{tag}.cfg"));
            fs::write(&config, haproxy_config(port, up, iface))?;
            let mut cmd = w.exec_in(&w.fwd, "haproxy");
            cmd.arg("-f").arg(&config).arg("-db");
            cmd
        }
    };
    let file = File::create(&log)?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let mut proc = Proc::spawn(forwarder.name(), &mut cmd)?;
    wait_listening(&mut proc, port, Some(&log))?;
    w.procs.push(proc);
    Ok((port, log))
}

/// One client connection: (set-up time, whether it completed). The client closes first.
fn one(addr: SocketAddr, msg: &[u8]) -> (Duration, bool) {
    let start = Instant::now();
    let attempt = || -> std::io::Result<Duration> {
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut b = [0u8; 101];
        s.read_exact(&mut b[..1])?;
        let setup = start.elapsed();
        s.write_all(msg)?;
        s.read_exact(&mut b[1..])?;
        if b[0] != GREETING || b[1..] != *msg {
            return Err(std::io::Error::other("wrong bytes back"));
        }
        Ok(setup)
    };
    match attempt() {
        Ok(setup) => (setup, true),
        Err(_) => (start.elapsed(), false),
    }
}

/// `(second, set-up µs, ok)` of every connection, from `THREADS` threads in `netns`.
type Record = (f64, u32, bool);

fn load(netns: &str, addr: SocketAddr, rate: f64, dur: Duration) -> Result<Vec<Record>> {
    let path = format!("/var/run/netns/{netns}");
    let mut msg = vec![b'e'; 100];
    msg[0] = b'E'; // neither QUIT nor SHORT: the server echoes until the client's EOF
    let t0 = Instant::now();
    let per_thread = rate / THREADS as f64;
    let results = thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|i| {
                let (path, msg) = (&path, &msg);
                scope.spawn(move || -> Result<Vec<Record>> {
                    let ns = File::open(path).with_context(|| format!("open {path}"))?;
                    // SAFETY: setns on a valid namespace descriptor; affects this thread only.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns {path}: {}", std::io::Error::last_os_error());
                    }
                    let mut out = Vec::new();
                    for k in 0.. {
                        let due = (k as f64 + i as f64 / THREADS as f64) / per_thread;
                        let now = t0.elapsed().as_secs_f64();
                        // Behind the schedule (a slow forwarder) the run still ends on time.
                        let end = dur.as_secs_f64();
                        if due >= end || now >= end || STOP.load(Ordering::Relaxed) {
                            break;
                        }
                        if due > now {
                            thread::sleep(Duration::from_secs_f64(due - now));
                        }
                        let (setup, ok) = one(addr, msg);
                        let at = t0.elapsed().as_secs_f64();
                        out.push((at, setup.as_micros().min(u32::MAX as u128) as u32, ok));
                    }
                    Ok(out)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))
            })
            .collect::<Vec<_>>()
    });
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    check_stop()?;
    Ok(all)
}

/// The `tw` count of `/proc/PID/net/sockstat` (the namespace of `pid`).
fn time_wait_of(pid: u32) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/net/sockstat")).unwrap_or_default();
    let line = text.lines().find(|l| l.starts_with("TCP:")).unwrap_or("");
    let mut words = line.split_whitespace();
    words
        .find(|w| *w == "tw")
        .and_then(|_| words.next()?.parse().ok())
        .unwrap_or(0)
}

fn summarize(
    forwarder: Forwarder,
    tw_reuse: u8,
    records: &[Record],
    secs: f64,
    rate: f64,
) -> Outcome {
    let ok: Vec<&Record> = records.iter().filter(|r| r.2).collect();
    let half = secs / 2.0;
    let mut late: Vec<Duration> = ok
        .iter()
        .filter(|r| r.0 >= half)
        .map(|r| Duration::from_micros(r.1.into()))
        .collect();
    late.sort_unstable();
    let mut per_second = vec![0usize; secs.ceil() as usize + 1];
    let last = per_second.len() - 1;
    for r in &ok {
        per_second[(r.0 as usize).min(last)] += 1;
    }
    let whole = secs.floor() as usize;
    Outcome {
        forwarder,
        tw_reuse,
        done: ok.len(),
        failed: records.len() - ok.len(),
        secs,
        late_rate: late.len() as f64 / (secs - half),
        late_p50_us: percentile(&late, 50.0),
        late_p99_us: percentile(&late, 99.0),
        // From second 1: the first second also holds the forwarder's warm-up.
        first_slow_second: per_second[..whole]
            .iter()
            .skip(1)
            .position(|&n| (n as f64) < 0.9 * rate)
            .map(|i| i + 1),
        time_wait: 0,
        cpu_us_per_conn: 0.0,
        warned: None,
    }
}

/// One run in a fresh world.
fn measure(i: usize, forwarder: Forwarder, tw_reuse: u8, args: &Params) -> Result<Outcome> {
    let mut w = World::create(i, &args.dir)?;
    w.sysctl(&format!("net.ipv4.tcp_tw_reuse={tw_reuse}"))?;
    let tag = format!("{i}");
    let (port, log) = start(&mut w, forwarder, &args.spliced, &tag)?;
    let pid = w.procs.last().map(Proc::pid).context("no forwarder")?;
    let cpu0 = sys::tree_cpu_seconds(pid);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let t0 = Instant::now();
    let records = load(&w.fwd, addr, args.rate, args.dur)?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = sys::tree_cpu_seconds(pid) - cpu0;
    let mut out = summarize(forwarder, tw_reuse, &records, secs, args.rate);
    out.time_wait = time_wait_of(pid);
    out.cpu_us_per_conn = cpu * 1e6 / (out.done + out.failed).max(1) as f64;
    let text = fs::read_to_string(&log).unwrap_or_default();
    out.warned = text
        .lines()
        .find(|l| l.contains("dials are slow finding a free local port"))
        .map(str::to_owned);
    for p in &mut w.procs {
        p.check_alive().with_context(|| log_tail(Some(&log)))?;
    }
    Ok(out)
}

/// What every run shares.
pub struct Params {
    pub spliced: PathBuf,
    pub dir: PathBuf,
    pub rate: f64,
    pub dur: Duration,
}

/// Runs the four cases and writes the section into `output`.
pub fn command(params: &Params, output: &Path) -> Result<()> {
    if params.rate <= 470.0 {
        bail!(
            "--rate {} is too low: the case is about rates above 470/s",
            params.rate
        );
    }
    fs::create_dir_all(&params.dir)?;
    let load_before = sys::load_average();
    let mut outcomes = Vec::new();
    let cases = [
        (Forwarder::Spliced, 2),
        (Forwarder::Haproxy, 2),
        (Forwarder::Spliced, 1),
        (Forwarder::Haproxy, 1),
    ];
    for (i, (f, reuse)) in cases.into_iter().enumerate() {
        eprintln!(
            "bench: time-wait {}/{}: {} with tcp_tw_reuse={reuse}",
            i + 1,
            cases.len(),
            f.name()
        );
        let o = measure(i, f, reuse, params)?;
        eprintln!(
            "bench: {} conn/s late, set-up p50 {:.0} µs, {} failed, {} TIME_WAIT",
            o.late_rate as u64, o.late_p50_us, o.failed, o.time_wait
        );
        outcomes.push(o);
    }
    let section = section(params, &outcomes, &load_before);
    println!("{section}");
    let old = fs::read_to_string(output).unwrap_or_default();
    fs::write(output, replace_section(&old, &section))
        .with_context(|| format!("cannot write {}", output.display()))?;
    eprintln!("bench: wrote the time-wait section of {}", output.display());
    Ok(())
}

/// `old` with its time-wait section replaced by `section` (appended if it had none).
pub fn replace_section(old: &str, section: &str) -> String {
    let kept = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{}", &old[..b], &old[e + END.len()..]),
        _ => old.to_owned(),
    };
    format!("{}\n\n{section}\n", kept.trim_end())
}

/// The time-wait section of `doc`, markers included, if it has one (the main bench keeps it).
pub fn kept_section(doc: &str) -> Option<&str> {
    let (b, e) = (doc.find(BEGIN)?, doc.find(END)?);
    (e > b).then(|| &doc[b..e + END.len()])
}

fn section(p: &Params, outcomes: &[Outcome], load_before: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "{BEGIN}\n## Client closes first: TIME_WAIT on the forwarder\n"
    );
    let _ = writeln!(
        md,
        "Measured by `cargo xtask bench --time-wait` on {} (spliced at commit {}): {} s per run \
         at {} connections/s \
         asked for, {THREADS} client threads, each connection: connect, the greeting, 100 bytes \
         echoed, the **client** closes first. Forwarder and client share a namespace of their \
         own (fresh per run, so no run inherits another's TIME_WAIT entries) and dial the echo \
         server at `[fe80::2%IF]:7000` in another; `net.ipv4.tcp_tw_reuse` is set in the \
         forwarder's namespace only. Load average (1 min) {load_before} before, {} after, on a \
         shared 2-core machine.\n",
        today(),
        sys::commit(),
        p.dur.as_secs(),
        group(p.rate as u64),
        sys::load_average()
    );
    let _ = writeln!(
        md,
        "| forwarder | tcp_tw_reuse | connections | failed | first second below 90% | conn/s, 2nd half | set-up p50 µs, 2nd half | p99 µs | TIME_WAIT at end | forwarder CPU µs/conn |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for o in outcomes {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {:.0} |",
            o.forwarder.name(),
            o.tw_reuse,
            group(o.done as u64),
            group(o.failed as u64),
            o.first_slow_second
                .map_or("never".into(), |s| format!("{s} s")),
            group(o.late_rate as u64),
            o.late_p50_us,
            o.late_p99_us,
            group(o.time_wait),
            o.cpu_us_per_conn
        );
    }
    let _ = writeln!(
        md,
        "\nWith the default `tcp_tw_reuse=2` (reuse for loopback addresses only) the forwarder's \
         TIME_WAIT entries to `fe80::2:7000` fill the 28,232 ports of the default range within \
         about 14 s at 2,000/s, and from then on every `connect()` searches the whole range: \
         both forwarders fall far below the rate asked for. With `tcp_tw_reuse=1` (the fix \
         spliced's warning names; IPv6 included) `connect()` takes a TIME_WAIT port once it is \
         1 s old and both hold the rate. TIME_WAIT counts all of the namespace's entries, the \
         client's loopback ones included.\n"
    );
    for o in outcomes
        .iter()
        .filter(|o| o.forwarder == Forwarder::Spliced)
    {
        let _ = writeln!(
            md,
            "- spliced, tcp_tw_reuse={}: {}",
            o.tw_reuse,
            o.warned.as_deref().map_or(
                "no warning (no dial was slowed by the port search)".into(),
                |w| { format!("warned once: `{}`", w.trim()) }
            )
        );
    }
    let _ = writeln!(
        md,
        "- The runs took {:.0} s each.",
        outcomes.first().map_or(0.0, |o| o.secs)
    );
    let _ = write!(md, "{END}");
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_replaced_and_kept() {
        let s1 = format!("{BEGIN}\none\n{END}");
        let doc = replace_section("# spliced benchmarks\n\ntable\n", &s1);
        assert_eq!(kept_section(&doc), Some(s1.as_str()));
        let s2 = format!("{BEGIN}\ntwo\n{END}");
        let doc = replace_section(&doc, &s2);
        assert!(
            doc.starts_with("# spliced benchmarks\n\ntable\n\n"),
            "{doc}"
        );
        assert_eq!(doc.matches(BEGIN).count(), 1, "{doc}");
        assert_eq!(kept_section(&doc), Some(s2.as_str()));
        assert_eq!(kept_section("no section"), None);
    }

    #[test]
    fn time_wait_of_this_namespace() {
        let me = std::process::id();
        assert!(fs::read_to_string(format!("/proc/{me}/net/sockstat")).is_ok());
        let _ = time_wait_of(me);
    }
}
