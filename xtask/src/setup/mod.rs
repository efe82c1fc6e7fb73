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
pub fn vm(arch: crate::arch::Arch) -> Result<()> {
    run()?;
    apt::ensure_vm(arch)?;
    cross(arch)
}

/// What building for `arch` adds to [`run`]: its glibc and musl Rust targets and, for arm64,
/// the cross gcc (the linker) and binutils (strip, objcopy) from Debian.
pub fn cross(arch: crate::arch::Arch) -> Result<()> {
    apt::ensure_packages(arch.cross_packages())?;
    toolchain::ensure_target(arch.gnu_target())?;
    toolchain::ensure_target(arch.musl_target())
}

/// What `cargo xtask system-test` adds for `arch`: the cross build, QEMU, debootstrap (and
/// qemu-user-static to finish a foreign one), e2fsprogs for the guest's disk and cpio for its
/// initrd.
pub fn system(arch: crate::arch::Arch) -> Result<()> {
    run()?;
    cross(arch)?;
    apt::ensure_system(arch)
}

/// The Debian packages `cargo xtask bench` runs (HAProxy, socat, systemd-socket-proxyd, iperf3).
pub fn bench_packages() -> Result<()> {
    apt::ensure_bench()
}

/// What `cargo xtask bench --perf DIR` adds: `perf` (Debian's linux-perf).
pub fn perf_package() -> Result<()> {
    apt::ensure_packages(&["linux-perf"])
}
