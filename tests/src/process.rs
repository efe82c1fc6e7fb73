//! Child processes: commands run to completion ([`run`] for `spliced`, [`run_command`],
//! [`sh`], [`stdout_of`]) and
//! long-running ones whose output is collected line by line ([`Process`]), stopped on drop.
use crate::wait_until;
use std::{
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

/// The `spliced` binary under test.
pub fn spliced_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SPLICED_BIN") {
        return bin.into();
    }
    let fallback = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/spliced");
    assert!(
        fallback.exists(),
        "no spliced binary: run the tests with `cargo xtask test`, or set SPLICED_BIN"
    );
    fallback
}

/// Runs `cmd`, panicking with its stderr unless it succeeds; returns its stdout.
pub fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `args[0] args[1..]`, panicking with its stderr unless it succeeds; returns its stdout.
pub fn sh(args: &[&str]) -> String {
    stdout_of(Command::new(args[0]).args(&args[1..]))
}

/// What a short-lived process printed, and its exit code.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Spawns `cmd` with stdin from /dev/null and stdout and stderr piped.
fn spawn_piped(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Runs `cmd` to completion, killing it (and failing) after `limit`.
pub fn run_command(cmd: &mut Command, limit: Duration) -> Run {
    let mut child = spawn_piped(cmd);
    let read = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {limit:?}:\n{}{}",
                stdout.join().unwrap(),
                stderr.join().unwrap()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    Run {
        code: status.code(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Runs `spliced ARGS` (with `RUST_LOG=info`) to completion, killing it (and failing) after
/// 10 s: for the forms that must not start a daemon.
pub fn run(args: &[&str]) -> Run {
    run_command(
        Command::new(spliced_bin())
            .args(args)
            .env("RUST_LOG", "info"),
        Duration::from_secs(10),
    )
}

/// Runs `spliced status ARGS` (as `user`, when given, through runuser); returns (exit code,
/// stdout, stderr).
pub fn status(args: &[&str], user: Option<&str>) -> (Option<i32>, String, String) {
    let bin = spliced_bin();
    let mut cmd = match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--"]).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let out = run_command(cmd.arg("status").args(args), Duration::from_secs(10));
    (out.code, out.stdout, out.stderr)
}

/// A running child process with its stdout and stderr collected line by line (the log);
/// SIGTERM, then SIGKILL after 2 s, on drop, and the log printed if the test is failing.
pub struct Process {
    child: Child,
    log: Arc<Mutex<String>>,
    /// What the log is of, for the message on failure.
    name: &'static str,
}

impl Process {
    /// Spawns `cmd` (stdin from /dev/null) and starts collecting its output.
    pub fn spawn(name: &'static str, cmd: &mut Command) -> Process {
        let mut child = spawn_piped(cmd);
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let log = log.clone();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        Process { child, log, name }
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The log itself, for a failure message while the process is borrowed mutably.
    pub fn shared_log(&self) -> Arc<Mutex<String>> {
        self.log.clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait")
    }

    /// Waits (at most `limit`) until the log has `count` lines containing `needle`.
    pub fn wait_log(&self, needle: &str, count: usize, limit: Duration) -> String {
        let found = || {
            let log = self.log();
            let n = log.lines().filter(|l| l.contains(needle)).count();
            (n >= count).then_some(log)
        };
        let failure = || {
            let log = self.log();
            format!("no {count} log line(s) with {needle:?} within {limit:?}:\n{log}")
        };
        wait_until(limit, Duration::from_millis(20), found, failure)
    }

    /// Sends `signal` (0 only checks that the process exists).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill on our own child.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(
            rc,
            0,
            "kill {signal} {}: {}",
            self.name,
            std::io::Error::last_os_error()
        );
    }

    /// Waits (at most `limit`) for the exit status.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let (name, log) = (self.name, self.shared_log());
        wait_until(
            limit,
            Duration::from_millis(20),
            || self.try_wait(),
            || {
                format!(
                    "{name} did not exit within {limit:?}:\n{}",
                    log.lock().unwrap()
                )
            },
        )
    }

    /// Panics if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_wait() {
            panic!("{} exited: {status}\n{}", self.name, self.log());
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill on our own child.
            unsafe { libc::kill(self.pid(), libc::SIGTERM) };
            for _ in 0..100 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.log());
        }
    }
}
