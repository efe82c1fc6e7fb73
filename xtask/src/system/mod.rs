//! `cargo xtask system-test [--arch amd64|arm64]`: the package installed in a real Debian
//! system, with systemd as PID 1, in QEMU under TCG.
//!
//! Builds the package ([`crate::deb`]), takes the cached debootstrap tree ([`image`]) and
//! Debian's own cloud kernel for that release ([`KERNEL`], from the VM suite's cache), and boots
//! the tree as an initramfs whose `/init` is systemd. An overlay archive adds the package, the
//! check script (`guest.sh`, every README "Install" command among its steps) and a unit that
//! runs it after `multi-user.target`. The script prints one line per check on the console;
//! this command prints the table and fails unless every check in [`CHECKS`] passed.
pub mod image;

use std::{
    fs,
    os::unix::fs::{symlink, PermissionsExt as _},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    arch::Arch,
    util::{is_root, reexec_as_root},
    vm::{kernel, qemu},
};

/// The command line.
#[derive(clap::Args)]
pub struct Args {
    /// The guest's architecture (arm64: qemu-system-aarch64, `virt` machine).
    #[arg(long, value_enum, default_value = "amd64")]
    pub arch: Arch,
}

/// The kernel series the guest boots: bookworm's own.
pub const KERNEL: &str = "6.1";

/// Every check the guest must report as passed, in the order it runs them.
pub const CHECKS: &[&str] = &[
    "install",
    "configure",
    "enable-now",
    "transfer-sha256",
    "reload-during-transfer",
    "bad-config-reload",
    "hardening",
    "journal",
    "socket-activation",
    "stop-drains",
    "remove-purge",
];

/// How long the guest may run, boot to power-off (amd64 about 5 minutes on a loaded host).
pub const GUEST_LIMIT: Duration = Duration::from_secs(900);

/// How long the guest may go without its first marker (systemd up, the checks' unit started)
/// before it is booted again (see [`qemu::boot`]).
const SILENT_LIMIT: Duration = Duration::from_secs(300);

const GUEST_SCRIPT: &str = include_str!("guest.sh");

/// The unit that runs the checks once the system is up; its output goes to the console.
const TEST_UNIT: &str = "\
[Unit]
Description=spliced system test
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/root/system-test.sh
ExecStopPost=/bin/systemctl poweroff --force --force
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
";

pub fn command(args: Args) -> Result<()> {
    if !is_root() {
        reexec_as_root()?;
    }
    run(args.arch, GUEST_LIMIT)
}

/// The whole test for `arch`: setup, package, image, boot, verdict.
pub fn run(arch: Arch, limit: Duration) -> Result<()> {
    let started = Instant::now();
    crate::setup::system(arch)?;
    let base = kernel::cache_dir()?.join("system");
    fs::create_dir_all(&base)?;
    let work = Work(base.join(format!("run-{}", std::process::id())));
    fs::create_dir_all(&work.0)?;
    let deb = crate::deb::build(arch, Some(work.0.join("deb")))?;
    let tree = image::tree(arch)?;
    let k = kernel::fetch(arch, KERNEL)?;
    let vmlinuz = qemu::loadable_kernel(arch, &k.vmlinuz, &work.0)?;
    let initrd = work.0.join("initrd.cpio");
    let base_cpio = base.join(format!("{}-{}.cpio", image::SUITE, arch.deb()));
    if !base_cpio.exists() {
        let tmp = base_cpio.with_extension(format!("tmp{}", std::process::id()));
        image::cpio(&tree, &tmp)?;
        fs::rename(&tmp, &base_cpio)?;
    }
    let overlay = work.0.join("overlay");
    stage_overlay(arch, &overlay, &deb)?;
    let overlay_cpio = work.0.join("overlay.cpio");
    image::cpio(&overlay, &overlay_cpio)?;
    concat(&[&base_cpio, &overlay_cpio], &initrd)?;
    let prepared = started.elapsed();
    eprintln!(
        "system: booting {} with systemd under TCG ({} s of set-up)",
        k.release,
        prepared.as_secs()
    );
    let console = base.join(format!("console-{}.log", arch.deb()));
    let running = work.0.join("console.log");
    let result = qemu::boot(&qemu::Guest {
        arch,
        mem_mib: 2048,
        vmlinuz: &vmlinuz,
        initrd: &initrd,
        console: &running,
        boot_log: false,
        limit,
        silent: SILENT_LIMIT,
        prefix: &format!("system {}: ", arch.deb()),
    });
    let _ = fs::copy(&running, &console);
    let text = result.with_context(|| format!("console: {}", console.display()))?;
    let verdict = Verdict::parse(&text);
    verdict.print(arch, &k.release, prepared, started.elapsed());
    let missing = verdict.missing();
    if !verdict.failed.is_empty() || !missing.is_empty() || !verdict.done {
        bail!(
            "system test on {} failed: {}{}{}; the console is in {}",
            arch.deb(),
            verdict.failed.join(", "),
            if missing.is_empty() {
                String::new()
            } else {
                format!(" never reported: {}", missing.join(", "))
            },
            if verdict.done {
                ""
            } else {
                " (the guest did not finish)"
            },
            console.display()
        );
    }
    Ok(())
}

/// The overlay: the package, the script, the unit enabled, `/init` pointing at systemd, and
/// no getty on the console the checks write to.
fn stage_overlay(arch: Arch, dir: &Path, deb: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    let units = dir.join("etc/systemd/system");
    fs::create_dir_all(units.join("multi-user.target.wants"))?;
    fs::create_dir_all(dir.join("root"))?;
    let name = deb.file_name().context("the package has a file name")?;
    fs::copy(deb, dir.join("root").join(name))?;
    let script = dir.join("root/system-test.sh");
    fs::write(&script, GUEST_SCRIPT)?;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
    fs::write(units.join("spliced-system-test.service"), TEST_UNIT)?;
    symlink(
        "../spliced-system-test.service",
        units.join("multi-user.target.wants/spliced-system-test.service"),
    )?;
    let (_, tty) = arch.qemu_machine();
    for unit in [
        format!("serial-getty@{tty}.service"),
        "getty@tty1.service".into(),
    ] {
        symlink("/dev/null", units.join(unit))?;
    }
    fs::write(dir.join("etc/hostname"), "spliced-system\n")?;
    symlink("/lib/systemd/systemd", dir.join("init"))?;
    Ok(())
}

fn concat(parts: &[&Path], out: &Path) -> Result<()> {
    let mut file =
        fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    for p in parts {
        let mut f = fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
        std::io::copy(&mut f, &mut file)?;
    }
    Ok(())
}

/// The run's directory, removed at the end.
struct Work(std::path::PathBuf);

impl Drop for Work {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What the guest reported.
#[derive(Debug, Default)]
pub struct Verdict {
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    /// `value KEY VALUE` lines: measurements the README quotes.
    pub values: Vec<(String, String)>,
    pub done: bool,
}

impl Verdict {
    pub fn parse(console: &str) -> Verdict {
        let mut v = Verdict::default();
        for line in console.lines() {
            let Some(m) = line
                .split_once("SPLICED-SYSTEM: ")
                .map(|(_, m)| m.trim_end())
            else {
                continue;
            };
            if let Some(name) = m.strip_prefix("ok ") {
                v.passed.push(name.to_string());
            } else if let Some(rest) = m.strip_prefix("fail ") {
                v.failed.push(rest.to_string());
            } else if let Some(rest) = m.strip_prefix("value ") {
                let (k, val) = rest.split_once(' ').unwrap_or((rest, ""));
                v.values.push((k.to_string(), val.to_string()));
            } else if m == "done" {
                v.done = true;
            }
        }
        v
    }

    /// Checks of [`CHECKS`] that reported neither ok nor fail.
    pub fn missing(&self) -> Vec<&'static str> {
        CHECKS
            .iter()
            .copied()
            .filter(|c| {
                !self.passed.iter().any(|p| p == c)
                    && !self.failed.iter().any(|f| f.split(':').next() == Some(c))
            })
            .collect()
    }

    fn print(&self, arch: Arch, kernel: &str, prepared: Duration, total: Duration) {
        println!();
        println!(
            "System test ({}, Debian {}, {kernel}, systemd as PID 1, TCG)",
            arch.deb(),
            image::SUITE
        );
        println!("| check | result |\n|---|---|");
        for c in CHECKS {
            let result = if self.passed.iter().any(|p| p == c) {
                "ok".to_string()
            } else if let Some(f) = self.failed.iter().find(|f| f.split(':').next() == Some(c)) {
                format!("FAILED{}", f.split_once(':').map(|x| x.1).unwrap_or(""))
            } else {
                "not reported".into()
            };
            println!("| {c} | {result} |");
        }
        for (k, v) in &self.values {
            println!("{k}: {v}");
        }
        println!(
            "set-up {}s (build, image, kernel), whole run {}m{:02}s",
            prepared.as_secs(),
            total.as_secs() / 60,
            total.as_secs() % 60
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_from_console() {
        let text = "noise\nSPLICED-SYSTEM: ok install\r\n\
                    [  OK  ] Started x\n\
                    SPLICED-SYSTEM: value security 2.1 OK\n\
                    SPLICED-SYSTEM: fail configure: exit 1: bad\n\
                    SPLICED-SYSTEM: done\n";
        let v = Verdict::parse(text);
        assert_eq!(v.passed, ["install"]);
        assert_eq!(v.failed, ["configure: exit 1: bad"]);
        assert_eq!(v.values, [("security".into(), "2.1 OK".into())]);
        assert!(v.done);
        let missing = v.missing();
        assert!(!missing.contains(&"install") && !missing.contains(&"configure"));
        assert!(missing.contains(&"remove-purge"));
    }

    #[test]
    fn every_check_is_in_the_script() {
        for c in CHECKS {
            assert!(
                GUEST_SCRIPT.contains(&format!("check {c} ")),
                "{c} is not run by guest.sh"
            );
        }
    }
}
