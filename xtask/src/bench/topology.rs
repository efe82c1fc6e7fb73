//! The bench's world and its cleanup: a network namespace `spliced-bench-<pid>` joined to the
//! host by a veth pair `spb<pid>` (host, fe80::1) / `spb<pid>p` (namespace, fe80::2), both
//! `nodad`; a scratch directory; the child processes. [`Guard`] removes all of it when dropped,
//! on success, on error and after Ctrl-C (SIGINT/SIGTERM only set [`STOP`], which every loop
//! checks). Children also get `PR_SET_PDEATHSIG`, so a bench killed hard takes them along; the
//! namespace it leaves is removed by the next run ([`remove_stale`]). `SPLICED_BENCH_KEEP=1`
//! keeps the scratch directory (the forwarders' logs and configurations, iperf3's JSON).
use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{describe, output, run};

/// Set by SIGINT/SIGTERM.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Routes SIGINT and SIGTERM to [`STOP`]. The children, in the same foreground process group,
/// get Ctrl-C themselves; the guard then stops whatever is left.
pub fn catch_signals() {
    // SAFETY: `on_signal` is async-signal-safe (one atomic store).
    unsafe {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Fails once Ctrl-C was pressed; called in every loop.
pub fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d` in small steps, failing early on Ctrl-C.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_stop()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Makes `cmd` receive SIGKILL when the thread that spawned it exits: spawn only from the main
/// thread.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A child and what it is, stopped (with its descendants) on drop.
pub struct Proc {
    pub what: String,
    pub child: Child,
}

impl Proc {
    pub fn spawn(what: impl Into<String>, cmd: &mut Command) -> Result<Proc> {
        let child = die_with_parent(cmd)
            .spawn()
            .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
        Ok(Proc {
            what: what.into(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited: {status}", self.what);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        stop_tree(&mut self.child, &self.what);
    }
}

/// SIGTERM to the child, up to 3 s for it to exit, then SIGKILL; then SIGKILL to any of its
/// descendants still there (socat's per-connection children), by pid.
pub fn stop_tree(child: &mut Child, what: &str) {
    let descendants = super::sys::descendants(child.id());
    if let Ok(None) = child.try_wait() {
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill on our own child's pid, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut exited = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                exited = true;
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        if !exited {
            eprintln!("bench: {what} did not stop within 3 s; killing it");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    for (pid, start) in descendants {
        if super::sys::is_same_live(pid, start) {
            if let Ok(pid) = i32::try_from(pid) {
                // SAFETY: the same process (pid and start time) that descended from our child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// The namespace, the veth pair and the scratch directory; removed on drop.
pub struct Guard {
    pub netns: String,
    pub host_if: String,
    pub ns_if: String,
    pub dir: PathBuf,
    netns_created: bool,
    /// Long-lived children (the servers in the namespace); dropped before the namespace goes.
    pub procs: Vec<Proc>,
}

impl Guard {
    /// Creates the namespace and the veth pair with fe80::1 (host) and fe80::2 (namespace).
    pub fn create() -> Result<Guard> {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("spliced-bench-{pid}"));
        let mut guard = Guard {
            netns: format!("spliced-bench-{pid}"),
            host_if: format!("spb{pid}"),
            ns_if: format!("spb{pid}p"),
            dir,
            netns_created: false,
            procs: Vec::new(),
        };
        fs::create_dir_all(&guard.dir)
            .with_context(|| format!("cannot create {}", guard.dir.display()))?;
        run(Command::new("ip").args(["netns", "add", &guard.netns]))?;
        guard.netns_created = true;
        let (ns, host, peer) = (
            guard.netns.as_str(),
            guard.host_if.as_str(),
            guard.ns_if.as_str(),
        );
        let steps: &[&[&str]] = &[
            &[
                "link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns,
            ],
            &["addr", "add", "fe80::1/64", "dev", host, "nodad"],
            &["link", "set", host, "up"],
            &["-n", ns, "addr", "add", "fe80::2/64", "dev", peer, "nodad"],
            &["-n", ns, "link", "set", peer, "up"],
            &["-n", ns, "link", "set", "lo", "up"],
        ];
        for args in steps {
            run(Command::new("ip").args(*args))?;
        }
        eprintln!("bench: namespace {ns}: veth {host} (fe80::1, host) <-> {peer} (fe80::2)");
        Ok(guard)
    }

    /// The host side's interface index, the zone of fe80::2.
    pub fn ifindex(&self) -> Result<u32> {
        let path = Path::new("/sys/class/net")
            .join(&self.host_if)
            .join("ifindex");
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{}: not a number: {text:?}", path.display()))
    }

    /// `ip netns exec NETNS program args...`.
    pub fn exec_in_ns(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.procs.clear();
        if self.netns_created {
            // Deleting the namespace deletes the veth pair with it.
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "delete", &self.netns]);
            if let Err(e) = run(&mut cmd) {
                eprintln!("bench: cleanup: {e:#}; remove it with `{}`", describe(&cmd));
            }
        }
        if std::env::var_os("SPLICED_BENCH_KEEP").is_some() {
            eprintln!("bench: cleaned up; logs kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
            eprintln!("bench: cleaned up");
        }
    }
}

/// Deletes `spliced-bench-<pid>` namespaces whose bench is gone (one killed hard).
pub fn remove_stale() -> Result<()> {
    let list = output(Command::new("ip").args(["netns", "list"]))?;
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix("spliced-bench-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        eprintln!("bench: removing stale namespace {name}");
        run(Command::new("ip").args(["netns", "delete", name]))?;
    }
    Ok(())
}
