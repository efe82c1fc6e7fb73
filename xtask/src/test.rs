//! `cargo xtask test`: every check and test, the one command CI runs. Runs as root because the
//! integration tests create network namespaces.
use std::{
    env,
    ffi::OsString,
    fs,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{
    cargo, is_root, output, path_with_cargo_bin, reexec_as_root, run, workspace_root,
};

/// Runs setup, fmt, clippy (host and eBPF), the fuzz targets, the build, `cargo test`, the VM
/// suite on the oldest and the newest amd64 kernel and the newest arm64 one, and the amd64 system
/// test; `args` go to `cargo test` (a filter, or `-- --nocapture`). When all of that passed, a
/// quick bench run checks that the bench works and writes a well-formed table. Checks that do
/// not depend on each other all run, so one run
/// shows every problem; the summary names the steps that failed.
pub fn command(args: Vec<OsString>) -> Result<()> {
    if !is_root() {
        reexec_as_root()?;
    }
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.clone(), Into::into);
    crate::disk::ensure_free(&target, RUN_NEEDS_GIB, "a full `cargo xtask test`")?;
    let mut steps = Steps::default();

    if !steps.run("setup", crate::setup::run) {
        return steps.finish();
    }
    checks(&mut steps, &root);
    // Every parser of untrusted bytes, 45 s per target from the checked-in corpora.
    steps.run("fuzz", crate::fuzz::ci);
    let mut bin = None;
    steps.run("build", || {
        bin = Some(crate::build::build_spliced(false)?);
        // The release build is what the bench step measures; built here so that step only
        // measures.
        crate::build::build_spliced(true)?;
        Ok(())
    });
    match bin {
        Some(bin) => after_build(&mut steps, &root, &bin, &args),
        None => steps.skipped.extend(AFTER_BUILD),
    }
    steps.finish()
}

/// fmt, and clippy on the host crates and on the eBPF crate.
fn checks(steps: &mut Steps, root: &Path) {
    steps.run("fmt", || {
        run(cargo()
            .current_dir(root)
            .args(["fmt", "--all", "--", "--check"]))
    });
    steps.run("clippy (host)", || {
        run(cargo()
            .current_dir(root)
            .env("AYA_BUILD_SKIP", "1")
            .args([
                "clippy",
                "--workspace",
                "--exclude",
                "proxy-ebpf",
                "--all-targets",
            ])
            .args(["--", "-D", "warnings"]))
    });
    steps.run("clippy (eBPF)", || {
        run(cargo()
            .current_dir(root.join("proxy-ebpf"))
            .env("PATH", path_with_cargo_bin()?)
            .args([
                "+nightly",
                "clippy",
                "--release",
                "--target",
                "bpfel-unknown-none",
            ])
            .args(["-Z", "build-std=core", "--", "-D", "warnings"]))
    });
}

// What a clean clone's full run leaves under `target/` and `~/.cache/spliced`, measured, with
// room to spare.
const RUN_NEEDS_GIB: u64 = 8;

// The names of the steps that need the build, in order (skipped together without one).
const TESTS: &str = "tests";
const VM_AMD64: &str = "integration tests in VMs (oldest and newest kernel)";
const VM_ARM64: &str = "integration tests in VMs (arm64, newest kernel)";
const SYSTEM: &str = "system test (amd64)";
const BENCH: &str = "bench (quick)";
const AFTER_BUILD: [&str; 5] = [TESTS, VM_AMD64, VM_ARM64, SYSTEM, BENCH];

/// The steps that need the build: the tests, the VM suite (the arm64 guest in the background
/// beside the amd64 ones), the system test, and the quick bench if everything else passed.
fn after_build(steps: &mut Steps, root: &Path, bin: &Path, args: &[OsString]) {
    steps.run(TESTS, || {
        remove_stale_namespaces()?;
        run(cargo()
            .current_dir(root)
            .env("SPLICED_REQUIRE_EBPF", "1")
            .env("SPLICED_BIN", bin)
            .env("PATH", path_with_cargo_bin()?)
            // Every test binary runs even when one fails: a failure must not hide
            // the others' results.
            .args([
                "test",
                "--workspace",
                "--exclude",
                "proxy-ebpf",
                "--no-fail-fast",
            ])
            .args(args))
    });
    // The newest arm64 kernel under qemu-system-aarch64 runs beside the amd64 guests:
    // each QEMU under TCG keeps one of the two cores busy, so together they take about
    // as long as the arm64 guest alone. A child xtask stopped at its bound; its output
    // is printed when it ends.
    let arm64 = Background::start(
        &["integration-test", "vm", "--arch", "arm64", "--kernel"],
        &crate::vm::ci_kernels_arm64(),
    );
    // The oldest and the newest kernel in QEMU (about 6 minutes; see crate::vm).
    steps.run(VM_AMD64, || {
        crate::vm::command(
            crate::arch::Arch::Amd64,
            crate::vm::ci_kernels(),
            &[],
            CI_GUEST_LIMIT,
        )
    });
    steps.run(VM_ARM64, || arm64?.finish(CI_ARM64_VM_LIMIT));
    // The package under a real systemd: a child xtask stopped at its bound.
    steps.run(SYSTEM, || {
        xtask_bounded(&["system-test", "--arch", "amd64"], &[], CI_SYSTEM_LIMIT)
    });
    // Only on a tree that passed everything else: a benchmark of a broken build says
    // nothing.
    if steps.failed.is_empty() {
        steps.run(BENCH, bench_quick);
    } else {
        steps.skipped.push(BENCH);
    }
}

/// `cargo xtask integration-test local`: setup, the build, and the integration tests (tests/) on
/// the host kernel, eBPF required.
pub fn local(args: Vec<OsString>) -> Result<()> {
    if !is_root() {
        reexec_as_root()?;
    }
    crate::setup::run()?;
    let bin = crate::build::build_spliced(false)?;
    remove_stale_namespaces()?;
    run(cargo()
        .current_dir(workspace_root())
        .env("SPLICED_REQUIRE_EBPF", "1")
        .env("SPLICED_BIN", &bin)
        .env("PATH", path_with_cargo_bin()?)
        .args(["test", "-p", "tests"])
        .args(&args))
}

/// `cargo xtask integration-test vm`: see [`crate::vm`]. Root for the packages it installs.
pub fn vm(arch: crate::arch::Arch, kernels: Vec<String>, filters: Vec<String>) -> Result<()> {
    if !is_root() {
        reexec_as_root()?;
    }
    crate::vm::command(arch, kernels, &filters, crate::vm::guest_limit(arch))
}

/// `cargo xtask bench --quick --output DIR/b.md` (this same xtask binary), stopped after
/// [`BENCH_LIMIT`]; then its table is parsed back: a row for every contender, every column in
/// every row, every cell a figure (see `bench::validate`).
fn bench_quick() -> Result<()> {
    let dir = env::temp_dir().join(format!("spliced-bench-check-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let output = dir.join("b.md");
    let result = (|| {
        let exe = env::current_exe().context("cannot find the xtask binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(["bench", "--quick", "--output"]).arg(&output);
        run_bounded(&mut cmd, BENCH_LIMIT)?;
        let md = fs::read_to_string(&output)
            .with_context(|| format!("cannot read {}", output.display()))?;
        let columns = crate::bench::validate(&md)
            .with_context(|| format!("{} is malformed", output.display()))?;
        eprintln!("xtask test: the bench table has every contender and all {columns} columns");
        Ok(())
    })();
    let _ = fs::remove_dir_all(&dir);
    result
}

/// How long one guest of the VM step may run: with the musl build, the step stays under 22
/// minutes even when both guests use all of it (a guest booted again after a silent first boot
/// adds at most `vm::SILENT_LIMIT`, 3 minutes). 330 s cut 5.10 off in its `cli` tests on
/// 2026-11-30, on a machine at half the speed of the one before (its `datapath` tests alone
/// took 297 s beside the arm64 guest, 147 s without it).
const CI_GUEST_LIMIT: Duration = Duration::from_secs(600);

/// The arm64 VM step as a whole, the cross build of the musl binaries included: measured 8m45s
/// with those binaries partly built, 20m05s cold on a host loaded by other builds (README
/// "Kernel requirements").
const CI_ARM64_VM_LIMIT: Duration = Duration::from_secs(1500);

/// The amd64 system test as a whole: package build (warm after the package test), cached image
/// and kernel, boot, checks. Measured 9m00s warm on a loaded host (README "System test").
const CI_SYSTEM_LIMIT: Duration = Duration::from_secs(1200);

/// A child xtask running beside the steps, its output kept in a file until it ends.
struct Background {
    child: std::process::Child,
    what: String,
    log: std::path::PathBuf,
    start: Instant,
}

impl Background {
    /// Starts this xtask binary with `args` and `more`.
    fn start(args: &[&str], more: &[String]) -> Result<Background> {
        let exe = env::current_exe().context("cannot find the xtask binary")?;
        let log =
            env::temp_dir().join(format!("spliced-ci-{}-{}.log", args[0], std::process::id()));
        let file =
            fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .args(more)
            .stdout(file.try_clone()?)
            .stderr(file);
        let what = crate::util::describe(&cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{what}`"))?;
        Ok(Background {
            child,
            what,
            log,
            start: Instant::now(),
        })
    }

    /// Waits for the child, stopped once `limit` has passed since it started; prints its
    /// output.
    fn finish(mut self, limit: Duration) -> Result<()> {
        let left = limit.saturating_sub(self.start.elapsed());
        let result = wait_bounded(&mut self.child, &self.what, left);
        let output = fs::read_to_string(&self.log).unwrap_or_default();
        eprint!("{output}");
        let _ = fs::remove_file(&self.log);
        result
    }
}

/// Runs this xtask binary with `args` and `more`, stopped after `limit` (see [`run_bounded`]).
fn xtask_bounded(args: &[&str], more: &[String], limit: Duration) -> Result<()> {
    let exe = env::current_exe().context("cannot find the xtask binary")?;
    run_bounded(Command::new(exe).args(args).args(more), limit)
}

/// How long the quick bench may take (its rounds took 136 s with the load average at 8 on 2
/// cores, ten contenders, and 164 s at load 10 with eleven; the release build is made before
/// this step). A bound against a hang, not a speed check: a shared machine's load must not
/// fail the run.
const BENCH_LIMIT: Duration = Duration::from_secs(300);

/// Runs `cmd` with inherited stdio; past `limit` sends it SIGTERM (the bench then cleans up),
/// and SIGKILL 20 s later.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<()> {
    let what = crate::util::describe(cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;
    wait_bounded(&mut child, &what, limit)
}

/// Waits for `child`; past `limit` sends it SIGTERM, and SIGKILL 20 s later.
fn wait_bounded(child: &mut std::process::Child, what: &str, limit: Duration) -> Result<()> {
    let start = Instant::now();
    let mut terminated = false;
    loop {
        if let Some(status) = child.try_wait()? {
            if terminated {
                bail!("`{what}` took more than {limit:?}; stopped");
            }
            if !status.success() {
                bail!("`{what}` failed: {status}");
            }
            return Ok(());
        }
        if !terminated && start.elapsed() > limit {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill on our own child, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            terminated = true;
        }
        if terminated && start.elapsed() > limit + Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{what}` took more than {limit:?} and ignored SIGTERM; killed");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The outcome of each step, for the summary line.
#[derive(Default)]
struct Steps {
    passed: Vec<&'static str>,
    failed: Vec<&'static str>,
    skipped: Vec<&'static str>,
}

impl Steps {
    /// Runs one step, prints its error if any; returns whether it passed.
    fn run(&mut self, name: &'static str, step: impl FnOnce() -> Result<()>) -> bool {
        eprintln!("xtask test: == {name} ==");
        match step() {
            Ok(()) => {
                self.passed.push(name);
                true
            }
            Err(e) => {
                eprintln!("xtask test: step `{name}` failed: {e:#}");
                self.failed.push(name);
                false
            }
        }
    }

    fn finish(self) -> Result<()> {
        if self.failed.is_empty() {
            eprintln!("xtask test: every step passed: {}", self.passed.join(", "));
            return Ok(());
        }
        let mut summary = format!("xtask test: FAILED step(s): {}", self.failed.join(", "));
        if !self.skipped.is_empty() {
            summary.push_str(&format!("; skipped: {}", self.skipped.join(", ")));
        }
        if !self.passed.is_empty() {
            summary.push_str(&format!("; passed: {}", self.passed.join(", ")));
        }
        bail!(summary)
    }
}

/// Deletes `spl-<pid>-<n>` namespaces whose test process is gone (a killed test leaves them
/// behind); those of a test run still alive are left alone.
fn remove_stale_namespaces() -> Result<()> {
    let list = output(Command::new("ip").args(["netns", "list"]))?;
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = test_namespace_pid(name) else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        eprintln!("xtask test: removing stale test namespace {name}");
        run(Command::new("ip").args(["netns", "delete", name]))?;
    }
    Ok(())
}

/// `spl-<pid>-<n>` -> pid.
fn test_namespace_pid(name: &str) -> Option<u32> {
    let (pid, n) = name.strip_prefix("spl-")?.split_once('-')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::test_namespace_pid;

    #[test]
    fn parses_test_namespace_names() {
        assert_eq!(test_namespace_pid("spl-1234-0"), Some(1234));
        assert_eq!(test_namespace_pid("spl-1234-17"), Some(1234));
        assert_eq!(test_namespace_pid("spliced-demo"), None);
        assert_eq!(test_namespace_pid("spl-abc-1"), None);
        assert_eq!(test_namespace_pid("spl-12"), None);
        assert_eq!(test_namespace_pid("spl-12-x"), None);
    }
}
