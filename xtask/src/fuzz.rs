//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (every parser of untrusted bytes), each
//! for a bounded time from its checked-in corpus in `fuzz/corpus/TARGET/`. New inputs libFuzzer
//! finds go to a scratch directory, not into the tree; a crash fails the run and names the input
//! to turn into a unit test.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{cargo, output, run, workspace_root};

/// How long `cargo xtask test` runs each target. Four targets at 45 s plus the sanitizer build
/// (about 3 minutes from clean on this 2-core machine) keep the step near 7 minutes.
pub const CI_SECONDS: u64 = 45;

/// `cargo xtask fuzz [TARGET...] [--seconds N]`: the named targets (all when none), `seconds` each.
pub fn command(targets: Vec<String>, seconds: u64) -> Result<()> {
    crate::setup::cargo_fuzz()?;
    run_all(&targets, Duration::from_secs(seconds))
}

/// The CI step: setup has run; every target for [`CI_SECONDS`].
pub fn ci() -> Result<()> {
    crate::setup::cargo_fuzz()?;
    run_all(&[], Duration::from_secs(CI_SECONDS))
}

fn run_all(wanted: &[String], each: Duration) -> Result<()> {
    let root = workspace_root();
    let start = Instant::now();
    run(fuzz_cargo(&root).args(["fuzz", "build"]))?;
    let all = list(&root)?;
    let targets: Vec<String> = if wanted.is_empty() {
        all
    } else {
        for t in wanted {
            if !all.contains(t) {
                bail!(
                    "no fuzz target {t:?}; fuzz/Cargo.toml has {}",
                    all.join(", ")
                );
            }
        }
        wanted.to_vec()
    };
    eprintln!("xtask fuzz: built in {:.0?}", start.elapsed());
    let scratch = env::temp_dir().join(format!("spliced-fuzz-{}", std::process::id()));
    let result = targets
        .iter()
        .try_for_each(|t| run_target(&root, t, each, &scratch.join(t)));
    let _ = fs::remove_dir_all(&scratch);
    eprintln!(
        "xtask fuzz: {} target(s), {:?} each, {:.0?} in all (build included)",
        targets.len(),
        each,
        start.elapsed()
    );
    result
}

/// `cargo +nightly` in the workspace root, with the eBPF build skipped (the targets link the
/// library only, and the eBPF object is built for another target anyway). The sanitizer build
/// of every dependency took most of the step (15 of 17.5 minutes from a clean clone on a loaded
/// machine), so its target directory is kept under `~/.cache/spliced/fuzz-target`, shared by
/// every checkout on the machine; only the workspace's own crates are rebuilt in a new one.
fn fuzz_cargo(root: &Path) -> Command {
    let mut cmd = cargo();
    cmd.current_dir(root)
        .env("AYA_BUILD_SKIP", "1")
        .arg("+nightly");
    if let Ok(cache) = crate::vm::kernel::cache_dir() {
        cmd.env("CARGO_TARGET_DIR", cache.join("fuzz-target"));
    }
    cmd
}

fn list(root: &Path) -> Result<Vec<String>> {
    let text = output(fuzz_cargo(root).args(["fuzz", "list"]))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

fn run_target(root: &Path, target: &str, each: Duration, scratch: &Path) -> Result<()> {
    let corpus = root.join("fuzz/corpus").join(target);
    if !corpus.is_dir() || fs::read_dir(&corpus)?.next().is_none() {
        bail!(
            "fuzz target {target} has no checked-in corpus in {}",
            corpus.display()
        );
    }
    let found = scratch.join("corpus");
    let artifacts: PathBuf = scratch.join("artifacts");
    fs::create_dir_all(&found).with_context(|| format!("cannot create {}", found.display()))?;
    fs::create_dir_all(&artifacts)?;
    eprintln!("xtask fuzz: {target} for {each:?}");
    let status = fuzz_cargo(root)
        .args(["fuzz", "run", target])
        .arg(&found)
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={}", each.as_secs()))
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .status()
        .with_context(|| format!("cannot run cargo fuzz for {target}"))?;
    if !status.success() {
        let inputs: Vec<String> = fs::read_dir(&artifacts)?
            .filter_map(|e| e.ok())
            .map(|e| e.path().display().to_string())
            .collect();
        // Keep the input: the scratch directory is removed after the run.
        let keep = root.join("fuzz/artifacts").join(target);
        fs::create_dir_all(&keep)?;
        for input in &inputs {
            let name = Path::new(input).file_name().unwrap_or_default();
            fs::copy(input, keep.join(name))?;
        }
        bail!(
            "fuzz target {target} failed ({status}); the input(s) are kept in {}: reproduce with \
             `cargo +nightly fuzz run {target} FILE` and add it to the unit tests",
            keep.display()
        );
    }
    Ok(())
}
