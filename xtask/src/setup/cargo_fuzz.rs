//! cargo-fuzz, which builds and runs the `fuzz/` targets with libFuzzer on nightly.
use std::process::Command;

use anyhow::{bail, Result};

use super::{report, Outcome};
use crate::util::{cargo, cargo_bin_dir, run};

/// The version pinned, so every machine fuzzes with the same driver.
const VERSION: &str = "0.13.2";

/// Installs cargo-fuzz into cargo's bin directory unless that version is there.
pub fn ensure() -> Result<()> {
    let thing = format!("cargo-fuzz {VERSION}");
    let bin = cargo_bin_dir()?.join("cargo-fuzz");
    if works(&bin) {
        report(&thing, &Outcome::Ok);
        return Ok(());
    }
    eprintln!("setup: building {thing} (about a minute)");
    run(cargo().args([
        "install",
        &format!("cargo-fuzz@{VERSION}"),
        "--locked",
        "--force",
    ]))?;
    if !works(&bin) {
        bail!(
            "{thing} was installed but `{} --version` does not print it",
            bin.display()
        );
    }
    report(&thing, &Outcome::Installed(String::new()));
    Ok(())
}

fn works(bin: &std::path::Path) -> bool {
    Command::new(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(VERSION))
}
