//! The Debian packages the tests and the demo call: `ip`, `curl`, `python3 -m http.server`,
//! `ps`/`kill`, `nsenter`/`unshare`/`runuser`, `iperf3`, `systemd-socket-activate` and
//! `systemd-analyze` (the daemon tests), `groff` (the man page test), HAProxy and nginx (the
//! PROXY protocol tests: real backends and a real front proxy); and, for `cargo xtask bench`
//! only, the forwarders it compares spliced with. The tests start their own HAProxy and nginx in
//! namespaces of their own; the system services the packages bring are not used (where an init
//! runs, nginx's default site answers on port 80 after the install).
use std::process::Command;

use anyhow::Result;

use super::{report, Outcome};
use crate::util::{is_root, run};

const PACKAGES: &[&str] = &[
    "iproute2",
    "curl",
    "python3",
    "procps",
    "util-linux",
    "iperf3",
    "systemd",
    "groff-base",
    "haproxy",
    "nginx-light",
];

/// What `cargo xtask bench` adds: HAProxy, socat, systemd (for `systemd-socket-activate` and
/// `systemd-socket-proxyd`) and iperf3.
const BENCH_PACKAGES: &[&str] = &["haproxy", "socat", "systemd", "iperf3"];

/// What `cargo xtask integration-test vm` adds: QEMU (installed without its recommends, about
/// 70 MB), busybox-static for the guest, `strip`, and xz/zstd for the kernel modules.
/// The arm64 guest's busybox and `ip` come from arm64 packages fetched into the cache (see
/// `vm::userland`), not from the host.
const VM_PACKAGES: &[&str] = &["busybox-static", "binutils", "xz-utils", "zstd"];

/// Installs the missing packages; `apt-get update` runs only when something is missing.
pub fn ensure() -> Result<()> {
    ensure_list(PACKAGES)
}

/// Installs the bench's missing packages, the same way.
pub fn ensure_bench() -> Result<()> {
    ensure_list(BENCH_PACKAGES)
}

/// Installs the VM suite's missing packages for `arch`, the same way.
pub fn ensure_vm(arch: crate::arch::Arch) -> Result<()> {
    ensure_list(VM_PACKAGES)?;
    ensure_list(&[arch.qemu_package()])
}

/// What `cargo xtask system-test` adds: debootstrap builds the guest's Debian, qemu-user-static
/// runs a foreign (arm64) one's second stage, e2fsprogs makes its disk image from a directory,
/// cpio packs its root as the initrd (a fresh Debian does not have it).
const SYSTEM_PACKAGES: &[&str] = &[
    "cpio",
    "debootstrap",
    "debian-archive-keyring",
    "e2fsprogs",
    "qemu-user-static",
    "xz-utils",
    "zstd",
];

/// Installs the system test's missing packages for `arch`.
pub fn ensure_system(arch: crate::arch::Arch) -> Result<()> {
    ensure_list(SYSTEM_PACKAGES)?;
    ensure_list(&[arch.qemu_package()])
}

/// Installs the missing ones of `packages`, the same way.
pub fn ensure_packages(packages: &[&'static str]) -> Result<()> {
    ensure_list(packages)
}

fn ensure_list(packages: &[&'static str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let missing = missing(packages)?;
    if !missing.is_empty() {
        apt_get(&["update"])?;
        let mut install = vec!["install", "-y", "--no-install-recommends"];
        install.extend(missing.iter().copied());
        apt_get(&install)?;
    }
    for package in packages {
        let outcome = if missing.contains(package) {
            Outcome::Installed(String::new())
        } else {
            Outcome::Ok
        };
        report(&format!("apt {package}"), &outcome);
    }
    Ok(())
}

/// The packages dpkg does not list as installed. `dpkg-query` exits 1 when one is unknown; its
/// stdout still lists the others, so the status is ignored.
fn missing(packages: &[&'static str]) -> Result<Vec<&'static str>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(packages)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = stdout
        .lines()
        .filter_map(|line| {
            let (name, status) = line.split_once(' ')?;
            status.starts_with("ii").then_some(name)
        })
        .collect();
    Ok(packages
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

fn apt_get(args: &[&str]) -> Result<()> {
    let mut cmd = if is_root() {
        Command::new("apt-get")
    } else {
        let mut sudo = Command::new("sudo");
        sudo.args(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
        sudo
    };
    run(cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args))
}
