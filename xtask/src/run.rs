//! `cargo xtask run`: builds spliced and replaces this process with it (as root), so Ctrl-C
//! and the exit status reach the daemon and the caller directly.
use std::{ffi::OsString, os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, Result};

use crate::util::{describe, is_root};

/// Builds, then execs `spliced ARGS`, through `sudo -E` when not root: only `exec` returns.
pub fn command(release: bool, args: Vec<OsString>) -> Result<()> {
    crate::setup::run()?;
    let bin = crate::build::build_spliced(release)?;
    let mut cmd = if is_root() {
        Command::new(&bin)
    } else {
        let mut sudo = Command::new("sudo");
        sudo.arg("-E").arg(&bin);
        sudo
    };
    cmd.args(args);
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot exec `{}`", describe(&cmd)))
}
