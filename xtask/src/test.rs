//! `cargo xtask test`: every check and test, the one command CI runs. Runs as root because the
//! integration tests create network namespaces.
use std::{ffi::OsString, path::Path, process::Command};

use anyhow::{bail, Result};

use crate::util::{
    cargo, is_root, output, path_with_cargo_bin, reexec_as_root, run, workspace_root,
};

/// Runs setup, fmt, clippy (host and eBPF), the build and `cargo test`; `args` go to `cargo test`
/// (a filter, or `-- --nocapture`). Checks that do not depend on each other all run, so one run
/// shows every problem; the summary names the steps that failed.
pub fn command(args: Vec<OsString>) -> Result<()> {
    if !is_root() {
        reexec_as_root()?;
    }
    let root = workspace_root();
    let mut steps = Steps::default();

    if !steps.run("setup", crate::setup::run) {
        return steps.finish();
    }
    steps.run("fmt", || {
        run(cargo()
            .current_dir(&root)
            .args(["fmt", "--all", "--", "--check"]))
    });
    steps.run("clippy (host)", || {
        run(cargo()
            .current_dir(&root)
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
    let mut bin = None;
    steps.run("build", || {
        bin = Some(crate::build::build_spliced(false)?);
        Ok(())
    });
    match bin {
        Some(bin) => {
            steps.run("tests", || {
                remove_stale_namespaces()?;
                run(cargo()
                    .current_dir(&root)
                    .env("SPLICED_REQUIRE_EBPF", "1")
                    .env("SPLICED_BIN", &bin)
                    .env("PATH", path_with_cargo_bin()?)
                    .args(["test", "--workspace", "--exclude", "proxy-ebpf"])
                    .args(&args))
            });
        }
        None => steps.skipped.push("tests"),
    }
    steps.finish()
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
