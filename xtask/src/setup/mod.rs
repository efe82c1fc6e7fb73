//! `cargo xtask setup`: installs what the build, the tests and the demo need, idempotently.
//! When everything is there it only looks (well under 2 s).
mod apt;
mod bpf_linker;
mod cargo_fuzz;
mod toolchain;

use anyhow::Result;

/// What one check found.
pub enum Outcome {
    /// Already there.
    Ok,
    /// Installed or repaired now; the text says what was done.
    Installed(String),
}

/// Prints the one line per thing that `setup` promises.
fn report(thing: &str, outcome: &Outcome) {
    match outcome {
        Outcome::Ok => eprintln!("setup: {thing}: ok"),
        Outcome::Installed(how) if how.is_empty() => eprintln!("setup: {thing}: installed"),
        Outcome::Installed(how) => eprintln!("setup: {thing}: installed ({how})"),
    }
}

/// Runs every setup step; the first failure stops it.
pub fn run() -> Result<()> {
    let nightly = toolchain::ensure_nightly()?;
    toolchain::ensure_host_components()?;
    bpf_linker::ensure(&nightly)?;
    apt::ensure()?;
    Ok(())
}

/// cargo-fuzz, for `cargo xtask fuzz` and the fuzz step of `cargo xtask test` (nightly is
/// installed by [`run`]).
pub fn cargo_fuzz() -> Result<()> {
    cargo_fuzz::ensure()
}

/// What `cargo xtask integration-test vm` adds: everything [`run`] installs, QEMU,
/// busybox-static, the tools that unpack kernel packages and modules, and the musl target.
pub fn vm() -> Result<()> {
    run()?;
    apt::ensure_vm()?;
    toolchain::ensure_target("x86_64-unknown-linux-musl")
}

/// The Debian packages `cargo xtask bench` runs (HAProxy, socat, systemd-socket-proxyd, iperf3).
pub fn bench_packages() -> Result<()> {
    apt::ensure_bench()
}
