//! Small helpers shared by the commands: running programs, privilege, paths.
use std::{
    convert::Infallible,
    env,
    ffi::{OsStr, OsString},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// The workspace root (the parent of this crate), whatever directory `cargo xtask` ran in.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `program arg arg`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut out = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}

/// Runs `cmd` with inherited stdio and fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout, failing unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}: {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether we run as root (the tests and the demo create network namespaces).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Re-runs this xtask invocation as root through `sudo -E`. `sudo` may reset `PATH`
/// (secure_path), so the current one is passed on explicitly: cargo and rustup live in it.
pub fn reexec_as_root() -> Result<Infallible> {
    let exe = env::current_exe().context("cannot find the xtask binary")?;
    let mut path = OsString::from("PATH=");
    path.push(env::var_os("PATH").unwrap_or_default());
    let mut cmd = Command::new("sudo");
    cmd.arg("-E")
        .arg("env")
        .arg(path)
        .arg(exe)
        .args(env::args_os().skip(1));
    eprintln!("xtask: not root, re-running through sudo");
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot exec `{}`", describe(&cmd)))
}

/// Where `cargo install` puts binaries: `$CARGO_INSTALL_ROOT/bin`, `$CARGO_HOME/bin` or
/// `~/.cargo/bin`.
pub fn cargo_bin_dir() -> Result<PathBuf> {
    if let Some(root) = env::var_os("CARGO_INSTALL_ROOT").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(root).join("bin"));
    }
    if let Some(home) = env::var_os("CARGO_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home).join("bin"));
    }
    Ok(home_dir()?.join(".cargo/bin"))
}

/// `$HOME`.
pub fn home_dir() -> Result<PathBuf> {
    env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// `PATH` with the cargo install directory first, so build scripts find `bpf-linker`.
pub fn path_with_cargo_bin() -> Result<OsString> {
    let bin = cargo_bin_dir()?;
    let current = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin.clone()];
    dirs.extend(env::split_paths(&current).filter(|d| *d != bin));
    env::join_paths(dirs).context("PATH contains an invalid entry")
}

/// `cargo`, the rustup proxy from `PATH`, so `cargo +nightly` works too.
pub fn cargo() -> Command {
    Command::new("cargo")
}

/// Whether `name` is a network interface on the host.
pub fn interface_exists(name: impl AsRef<OsStr>) -> bool {
    Path::new("/sys/class/net").join(name.as_ref()).exists()
}
