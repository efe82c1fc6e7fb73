//! `cargo xtask build`: builds `spliced` with its eBPF object and finds the binary from cargo's
//! JSON messages, never from a guessed `target/` path.
use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::Stdio,
};

use anyhow::{bail, Context as _, Result};

use crate::util::{cargo, describe, path_with_cargo_bin, workspace_root};

/// The command: setup, then build and print the binary's path on stdout.
pub fn command(release: bool) -> Result<()> {
    crate::setup::run()?;
    let bin = build_spliced(release)?;
    println!("{}", bin.display());
    Ok(())
}

/// Builds `spliced` (package `proxy-user`) and returns the executable's path. The eBPF object is
/// required (`SPLICED_REQUIRE_EBPF=1`): a binary that silently fell back to splice would hide a
/// broken toolchain. Run setup first.
pub fn build_spliced(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.current_dir(workspace_root())
        .args(["build", "-p", "proxy-user", "--bin", "spliced"])
        .arg("--message-format=json-render-diagnostics")
        .env("SPLICED_REQUIRE_EBPF", "1")
        .env("PATH", path_with_cargo_bin()?)
        .stdout(Stdio::piped());
    if release {
        cmd.arg("--release");
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
    let stdout = child.stdout.take().context("cargo's stdout is not piped")?;
    let mut executable = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(msg) => {
                if let Some(path) = spliced_executable(&msg) {
                    executable = Some(path);
                }
            }
            // Not a JSON message (a build script printing to stdout): pass it on.
            Err(_) => println!("{line}"),
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("`{}` failed: {status}", describe(&cmd));
    }
    executable.context("cargo built no `spliced` executable")
}

/// The executable of a `compiler-artifact` message for the `spliced` binary target.
fn spliced_executable(msg: &serde_json::Value) -> Option<PathBuf> {
    if msg["reason"] != "compiler-artifact" || msg["target"]["name"] != "spliced" {
        return None;
    }
    msg["executable"].as_str().map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::spliced_executable;

    #[test]
    fn finds_the_executable_of_the_spliced_binary_only() {
        let bin = serde_json::json!({
            "reason": "compiler-artifact",
            "target": {"name": "spliced", "kind": ["bin"]},
            "executable": "/x/target/debug/spliced",
        });
        let lib = serde_json::json!({
            "reason": "compiler-artifact",
            "target": {"name": "spliced", "kind": ["lib"]},
            "executable": null,
        });
        assert_eq!(
            spliced_executable(&bin),
            Some("/x/target/debug/spliced".into())
        );
        assert_eq!(spliced_executable(&lib), None);
    }
}
