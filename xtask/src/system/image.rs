//! The guest's Debian: `debootstrap --variant=minbase` of bookworm with systemd as init and
//! the few tools the checks use, cached under `~/.cache/spliced/system/bookworm-<arch>/`, and
//! booted as an initramfs (the whole tree, then an overlay archive with the package and the
//! test), so the guest needs no disk, no block or file system driver and no boot loader.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{arch::Arch, util::run, vm::kernel::cache_dir};

/// The Debian release the guest runs.
pub const SUITE: &str = "bookworm";

/// What `--include` adds to minbase: systemd as PID 1 (systemd-sysv), dbus for systemctl's
/// bus, the package's dependencies (adduser; libc6 and libgcc-s1 are there already), and the
/// test's tools: iproute2 (`ss`), socat (the upstreams and clients), pv (a slow reader),
/// procps (`pgrep`).
const INCLUDE: &str = "systemd,systemd-sysv,dbus,iproute2,socat,pv,adduser,libgcc-s1,procps";

/// The cached tree for `arch`, made with debootstrap when missing (minutes: amd64 about 3,
/// arm64 longer, its maintainer scripts running under qemu-user).
pub fn tree(arch: Arch) -> Result<PathBuf> {
    let base = cache_dir()?.join("system");
    let dir = base.join(format!("{SUITE}-{}", arch.deb()));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    fs::create_dir_all(&base)?;
    if arch != Arch::Amd64 {
        register_binfmt(arch)?;
    }
    let tmp = base.join(format!("{SUITE}-{}.tmp{}", arch.deb(), std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    eprintln!(
        "system: debootstrap {SUITE} {} into {} (cached afterwards)",
        arch.deb(),
        dir.display()
    );
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include", INCLUDE])
        .arg(format!("--arch={}", arch.deb()))
        .arg(SUITE)
        .arg(&tmp)
        .arg("http://deb.debian.org/debian"))?;
    // The package lists and downloaded packages are not needed in the guest.
    for d in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let _ = Command::new("find")
            .arg(tmp.join(d))
            .args(["-type", "f", "-name", "*.deb", "-delete"])
            .status();
    }
    fs::write(tmp.join(".complete"), "")?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&tmp, &dir)?;
    Ok(dir)
}

/// Makes the kernel run `arch`'s binaries through qemu-user-static, so debootstrap can run a
/// foreign tree's maintainer scripts in a chroot: mounts binfmt_misc if needed and registers
/// the handler from qemu-user-static's own binfmt.d file.
fn register_binfmt(arch: Arch) -> Result<()> {
    let name = match arch {
        Arch::Arm64 => "qemu-aarch64",
        Arch::Amd64 => return Ok(()),
    };
    let misc = Path::new("/proc/sys/fs/binfmt_misc");
    if !misc.join("register").exists() {
        run(Command::new("mount")
            .args(["-t", "binfmt_misc", "binfmt_misc"])
            .arg(misc))?;
    }
    if misc.join(name).exists() {
        return Ok(());
    }
    let conf = fs::read_to_string(format!("/usr/lib/binfmt.d/{name}.conf"))
        .with_context(|| format!("qemu-user-static has no binfmt.d file for {name}"))?;
    let line = conf
        .lines()
        .find(|l| l.starts_with(&format!(":{name}:")))
        .context("no registration line")?;
    // The packaged line has the F flag already (the interpreter is opened at registration).
    fs::write(misc.join("register"), line)
        .with_context(|| format!("cannot register {name} with binfmt_misc"))?;
    eprintln!("system: registered {name} (qemu-user-static) with binfmt_misc");
    Ok(())
}

/// Writes `tree` as a `newc` cpio archive to `out`, in name order (`cpio` keeps owners, modes,
/// device nodes and hard links as they are in the tree).
pub fn cpio(tree: &Path, out: &Path) -> Result<()> {
    let file = fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut find = Command::new("sh")
        .current_dir(tree)
        .arg("-c")
        .arg("find . -mindepth 1 ! -name .complete -print0 | LC_ALL=C sort -z")
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run find")?;
    let list = find.stdout.take().context("find's stdout")?;
    let status = Command::new("cpio")
        .current_dir(tree)
        .args(["--null", "--create", "--format=newc", "--quiet"])
        .stdin(list)
        .stdout(file)
        .status()
        .context("cannot run cpio (`apt-get install cpio`)")?;
    let found = find.wait()?;
    if !status.success() || !found.success() {
        bail!("cpio of {} failed: {status}", tree.display());
    }
    Ok(())
}
