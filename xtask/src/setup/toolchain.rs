//! The Rust toolchains: nightly with `rust-src` and clippy (the eBPF crate is built with
//! `-Z build-std=core`), and rustfmt and clippy on the toolchain that runs xtask.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use super::{report, Outcome};
use crate::util::{output, run};

/// Makes sure nightly, its `rust-src` and its clippy are installed; returns its sysroot.
pub fn ensure_nightly() -> Result<PathBuf> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(is_plain_nightly);
    let outcome = if installed {
        Outcome::Ok
    } else {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src,clippy",
        ]))?;
        Outcome::Installed(String::new())
    };
    report("rust nightly toolchain", &outcome);

    let sysroot = sysroot(Some("nightly"))?;
    let src = sysroot.join("lib/rustlib/src/rust/library/core");
    let outcome = component(&src, "rust-src", Some("nightly"))?;
    report("rust nightly rust-src", &outcome);
    let clippy = sysroot.join("bin/cargo-clippy");
    let outcome = component(&clippy, "clippy", Some("nightly"))?;
    report("rust nightly clippy", &outcome);
    Ok(sysroot)
}

/// rustfmt and clippy for `cargo fmt` and `cargo clippy` on the host toolchain.
pub fn ensure_host_components() -> Result<()> {
    let sysroot = sysroot(None)?;
    for (file, name) in [("bin/rustfmt", "rustfmt"), ("bin/cargo-clippy", "clippy")] {
        let outcome = component(&sysroot.join(file), name, None)?;
        report(&format!("rust {name}"), &outcome);
    }
    Ok(())
}

/// `nightly-<host>`, not a dated `nightly-2025-01-01-<host>`.
fn is_plain_nightly(name: &str) -> bool {
    name.strip_prefix("nightly-")
        .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// The sysroot of `toolchain`, or of the one running xtask (rustup's proxy resolves that from
/// `RUSTUP_TOOLCHAIN`, which cargo sets, or the default).
fn sysroot(toolchain: Option<&str>) -> Result<PathBuf> {
    let mut cmd = Command::new("rustc");
    if let Some(t) = toolchain {
        cmd.arg(format!("+{t}"));
    }
    cmd.args(["--print", "sysroot"]);
    let out = output(&mut cmd).context("cannot find the toolchain's sysroot")?;
    Ok(PathBuf::from(out.trim()))
}

/// Adds component `name` unless `marker` (a file it installs) exists.
fn component(marker: &Path, name: &str, toolchain: Option<&str>) -> Result<Outcome> {
    if marker.exists() {
        return Ok(Outcome::Ok);
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "add", name]);
    if let Some(t) = toolchain {
        cmd.args(["--toolchain", t]);
    }
    run(&mut cmd)?;
    Ok(Outcome::Installed(String::new()))
}

/// Adds rustup target `target` to the toolchain running xtask unless it is installed.
pub fn ensure_target(target: &str) -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?
        .lines()
        .any(|l| l.trim() == target);
    let outcome = if installed {
        Outcome::Ok
    } else {
        run(Command::new("rustup").args(["target", "add", target]))?;
        Outcome::Installed(String::new())
    };
    report(&format!("rust target {target}"), &outcome);
    Ok(())
}
