//! `--perf DIR`: profiles of each case of a contender's first round. During the case two
//! `perf record -g` run: one on the forwarder's process (`-p PID`, its later children and
//! threads inherit it), one on the whole machine (`-a`, every CPU, kernel threads included);
//! afterwards `perf report --stdio` writes their top entries into DIR. Without `--perf` nothing
//! here runs, so the figures are not touched; with it, perf's own sampling and writing is on the
//! machine during the case and shows in the all-tasks CPU figures.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::topology::{check_stop, die_with_parent};

/// Samples per second and CPU: low enough that the profiler stays a small load on 2 cores.
const FREQUENCY: &str = "499";
/// Lines of each flat summary.
const TOP: usize = 40;
/// Call-graph lines kept per summary.
const GRAPH_LINES: usize = 400;

/// Where the profiles go.
pub struct Perf {
    dir: PathBuf,
}

/// The recordings of one case, running.
pub struct Recording {
    name: String,
    runs: Vec<(Child, PathBuf, &'static str)>,
}

impl Perf {
    pub fn new(dir: &Path) -> Result<Perf> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Perf {
            dir: dir.to_path_buf(),
        })
    }

    /// Starts recording case `name` (machine-wide, and on `daemon` if there is one); returns once
    /// perf has written its header, so the case's traffic is inside the profile.
    pub fn start(&self, name: &str, daemon: Option<u32>) -> Result<Recording> {
        let mut runs = Vec::new();
        let mut targets = vec![("all", vec!["-a".to_string()])];
        if let Some(pid) = daemon {
            targets.push(("daemon", vec!["-p".into(), pid.to_string()]));
        }
        for (kind, args) in targets {
            let data = self.dir.join(format!("{name}-{kind}.data"));
            let _ = fs::remove_file(&data);
            let log = fs::File::create(self.dir.join(format!("{name}-{kind}.log")))?;
            let mut cmd = Command::new("perf");
            cmd.args(["record", "-g", "-F", FREQUENCY, "-o"])
                .arg(&data)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            let child = die_with_parent(&mut cmd)
                .spawn()
                .context("cannot start perf (Debian package linux-perf)")?;
            runs.push((child, data, kind));
        }
        let rec = Recording {
            name: name.to_string(),
            runs,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        // Bounded by the deadline: perf writes the file's header once its events are open.
        while rec
            .runs
            .iter()
            .any(|(_, data, _)| fs::metadata(data).map_or(true, |m| m.len() == 0))
        {
            check_stop()?;
            if Instant::now() > deadline {
                eprintln!("bench: perf for {name} has not started after 10 s; going on");
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        Ok(rec)
    }
}

impl Recording {
    /// Stops the recordings (SIGINT, as Ctrl-C would) and writes `NAME-KIND.txt` summaries.
    pub fn finish(mut self) -> Result<()> {
        for (child, _, _) in &mut self.runs {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill on our own child's pid, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGINT) };
            }
        }
        for (child, data, kind) in std::mem::take(&mut self.runs) {
            wait(child, &self.name)?;
            let summary = summarize(&data, kind)?;
            let txt = data.with_extension("txt");
            fs::write(&txt, summary).with_context(|| format!("cannot write {}", txt.display()))?;
        }
        Ok(())
    }
}

impl Drop for Recording {
    /// A case that failed: the recordings are stopped without a summary.
    fn drop(&mut self) {
        for (child, _, _) in &mut self.runs {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Up to 20 s for perf to write its data and exit, then SIGKILL.
fn wait(mut child: Child, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            eprintln!("bench: perf for {name} did not stop within 20 s; killing it");
            let _ = child.kill();
            let _ = child.wait();
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The flat top entries (self time, by command, object and symbol) and the call graphs of the
/// entries over 2%.
fn summarize(data: &Path, kind: &str) -> Result<String> {
    let report = |extra: &[&str]| -> Result<String> {
        let out = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "-i"])
            .arg(data)
            .args(extra)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .context("cannot run perf report")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let sort = if kind == "all" {
        "comm,dso,sym"
    } else {
        "dso,sym"
    };
    let flat = report(&["-g", "none", "--sort", sort, "--percent-limit", "0.3"])?;
    let graphs = report(&[
        "-g",
        "caller,2,callee",
        "--sort",
        sort,
        "--percent-limit",
        "2",
    ])?;
    let keep = |text: &str, n: usize| -> String {
        text.lines()
            .filter(|l| !l.trim().is_empty() && (!l.starts_with('#') || l.contains("Samples")))
            .take(n)
            .map(|l| format!("{}\n", l.trim_end()))
            .collect()
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# perf record -g -F {FREQUENCY} {} ; perf report --stdio --no-children --sort {sort}\n\
         # data: {}\n\n## Top {TOP} by self time\n",
        if kind == "all" { "-a" } else { "-p DAEMON" },
        data.display()
    );
    s.push_str(&keep(&flat, TOP));
    let _ = writeln!(
        s,
        "\n## Call graphs of the entries over 2% (caller order)\n"
    );
    s.push_str(&keep(&graphs, GRAPH_LINES));
    Ok(s)
}

/// Runs `case`, profiled as `name` when `perf` is given (a profiler that fails is reported and
/// the case goes on without it; the case's own failure is returned as it is).
pub fn during<T>(
    perf: Option<&Perf>,
    name: &str,
    daemon: Option<u32>,
    case: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let Some(perf) = perf else {
        return case();
    };
    let rec = match perf.start(name, daemon) {
        Ok(rec) => Some(rec),
        Err(e) => {
            eprintln!("bench: perf for {name}: {e:#}");
            None
        }
    };
    let out = case();
    if let Some(rec) = rec {
        if let Err(e) = rec.finish() {
            eprintln!("bench: perf report for {name}: {e:#}");
        }
    }
    out
}
