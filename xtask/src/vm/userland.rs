//! The guest's busybox and iproute2 `ip` (with its shared libraries). On amd64 the host's own;
//! for another architecture, Debian bookworm's packages of that architecture, fetched with the
//! private apt configuration and unpacked under `~/.cache/spliced/userland-<arch>/`.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use super::kernel::{apt_dir, cache_dir, Apt};
use crate::{arch::Arch, util::run};

/// busybox-static, iproute2 and the libraries `/usr/sbin/ip` needs in bookworm (`ldd` on the
/// amd64 host names the same sonames: libbpf, libelf, libmnl, libbsd, libcap, libc, libz, libmd).
const PACKAGES: &[&str] = &[
    "busybox-static",
    "iproute2",
    "libc6",
    "libbpf1",
    "libelf1",
    "libmnl0",
    "libbsd0",
    "libcap2",
    "zlib1g",
    "libmd0",
];

/// Where the guest's programs come from.
pub enum Userland {
    /// The host's `/bin/busybox` and `/usr/sbin/ip` (`ldd` finds the libraries).
    Host,
    /// An unpacked tree of another architecture's packages.
    Foreign(PathBuf),
}

impl Userland {
    /// The userland for `arch`, fetched and unpacked once.
    pub fn get(arch: Arch) -> Result<Userland> {
        if arch == Arch::Amd64 {
            return Ok(Userland::Host);
        }
        let dir = cache_dir()?.join(format!("userland-{}", arch.deb()));
        if dir.join(".complete").exists() {
            return Ok(Userland::Foreign(dir));
        }
        let apt = Apt::new(&apt_dir(arch)?, arch)?;
        if apt.lists_stale() {
            apt.update()?;
        }
        let dl = cache_dir()?.join(format!("userland-{}.deb", arch.deb()));
        let _ = fs::remove_dir_all(&dl);
        fs::create_dir_all(&dl)?;
        for pkg in PACKAGES {
            eprintln!("vm: downloading {pkg}:{}", arch.deb());
            apt.download(&dl, &format!("{pkg}/bookworm"))
                .with_context(|| format!("cannot download {pkg}:{} (bookworm)", arch.deb()))?;
        }
        let tmp = cache_dir()?.join(format!("userland-{}.tmp{}", arch.deb(), std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        for entry in fs::read_dir(&dl)? {
            run(Command::new("dpkg-deb")
                .arg("-x")
                .arg(entry?.path())
                .arg(&tmp))?;
        }
        fs::write(tmp.join(".complete"), "")?;
        let _ = fs::remove_dir_all(&dir);
        fs::rename(&tmp, &dir)?;
        let _ = fs::remove_dir_all(&dl);
        Ok(Userland::Foreign(dir))
    }

    /// busybox's path on the build host.
    pub fn busybox(&self) -> PathBuf {
        match self {
            Userland::Host => PathBuf::from("/bin/busybox"),
            Userland::Foreign(root) => root.join("bin/busybox"),
        }
    }

    /// `ip`'s path on the build host.
    pub fn ip(&self) -> Result<PathBuf> {
        match self {
            Userland::Host => Ok(PathBuf::from("/usr/sbin/ip")),
            Userland::Foreign(root) => ["bin/ip", "sbin/ip", "usr/sbin/ip", "usr/bin/ip"]
                .iter()
                .map(|p| root.join(p))
                .find(|p| p.is_file() && !p.is_symlink())
                .with_context(|| format!("no ip in {}", root.display())),
        }
    }

    /// Every shared object of the foreign tree: (guest path, host file or symlink target).
    pub fn libraries(&self) -> Result<Vec<(String, Lib)>> {
        let Userland::Foreign(root) = self else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for base in ["lib", "usr/lib"] {
            collect(root, &root.join(base), &mut out)?;
        }
        if out.is_empty() {
            bail!("no shared libraries under {}", root.display());
        }
        Ok(out)
    }
}

/// A library file or a symlink to one.
pub enum Lib {
    File(PathBuf),
    Symlink(String),
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, Lib)>) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if kind.is_dir() {
            collect(root, &path, out)?;
            continue;
        }
        if !name.contains(".so") {
            continue;
        }
        let rel = path
            .strip_prefix(root)
            .context("a library outside its tree")?
            .to_string_lossy()
            .into_owned();
        if kind.is_symlink() {
            let target = fs::read_link(&path)?.to_string_lossy().into_owned();
            out.push((rel, Lib::Symlink(target)));
        } else {
            out.push((rel, Lib::File(path)));
        }
    }
    Ok(())
}
