//! Debian cloud kernels for the VM suite: found and fetched with `apt-get download` through a
//! private apt configuration (the host's own sources are left alone), unpacked and cached under
//! `~/.cache/spliced/kernels/`.
//!
//! Which suite carries which kernel (see shared/docs/toolchain.md): 5.10 in bullseye-security,
//! 6.1 in bookworm, 6.12 in bookworm-security, 7.x in sid (there split into `linux-binary-*`,
//! which has the kernel image, and `linux-modules-*`). All have BPF, sockmap and BTF built in;
//! `veth` is a module, taken from the same package set as the kernel.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    arch::Arch,
    util::{home_dir, output, run},
};

/// The suites the private apt configuration adds.
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main
";

/// Package lists older than this are refreshed before a kernel is looked up (sid moves fast:
/// an old list names packages the mirror no longer has).
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// A kernel unpacked in the cache: its image and the modules the guest needs.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r`: `5.10.0-46-cloud-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// The unpacked packages' root (modules under `lib/modules` or `usr/lib/modules`).
    pub root: PathBuf,
}

impl Kernel {
    /// `lib/modules/<release>` inside the unpacked tree.
    pub fn modules_dir(&self) -> Result<PathBuf> {
        for base in ["lib/modules", "usr/lib/modules"] {
            let dir = self.root.join(base).join(&self.release);
            if dir.join("kernel").is_dir() {
                return Ok(dir);
            }
        }
        bail!(
            "no modules for {} under {}",
            self.release,
            self.root.display()
        )
    }
}

/// The cache directory: `~/.cache/spliced`.
pub fn cache_dir() -> Result<PathBuf> {
    Ok(home_dir()?.join(".cache/spliced"))
}

/// Finds (in the cache, else through apt) and unpacks the newest cloud kernel of `requested`
/// for `arch`.
pub fn fetch(arch: Arch, requested: &str) -> Result<Kernel> {
    fetch_once(arch, requested, false)
}

/// [`fetch`]; after a failed download with lists that were not just refreshed, refreshes them
/// and tries once more (`retried`), never again (a file the index names but the mirror does
/// not serve, like 5.10's arm64 images here, would otherwise loop forever).
fn fetch_once(arch: Arch, requested: &str, retried: bool) -> Result<Kernel> {
    let want = Want::parse(requested, arch)?;
    let cache = cache_dir()?.join("kernels");
    fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let apt = Apt::new(&apt_dir(arch)?, arch)?;
    let mut refreshed = false;
    if apt.lists_stale() {
        match apt.update() {
            Ok(()) => refreshed = true,
            // Offline with a kernel already cached: use it.
            Err(e) => match cached(&cache, &want)? {
                Some(k) => {
                    eprintln!("vm: apt-get update failed ({e:#}); using the cached {k}");
                    return unpacked(&cache, &k);
                }
                None => return Err(e),
            },
        }
    }
    let names = apt.package_names()?;
    let Some(choice) = choose(&names, &want) else {
        bail!(
            "no Debian cloud kernel {requested} for {} in bookworm, bookworm-security, \
             bullseye-security or sid",
            arch.deb()
        );
    };
    let dir = cache.join(&choice.release);
    if !dir.join(".complete").exists() {
        let dl = cache.join("deb");
        fs::create_dir_all(&dl)?;
        let download = || -> Result<()> {
            for pkg in &choice.packages {
                if !has_deb(&dl, pkg)? {
                    eprintln!("vm: downloading {pkg}");
                    apt.download(&dl, pkg)?;
                }
            }
            Ok(())
        };
        if let Err(e) = download() {
            if refreshed || retried {
                return Err(e);
            }
            // An old list may name a package the mirror dropped: refresh once, look again.
            eprintln!("vm: {e:#}; refreshing the package lists");
            apt.update()?;
            return fetch_once(arch, requested, true);
        }
        let _ = fs::remove_dir_all(&dir);
        let tmp = cache.join(format!("{}.tmp{}", choice.release, std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        for pkg in &choice.packages {
            let deb = find_deb(&dl, pkg)?;
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        }
        fs::write(tmp.join(".complete"), "")?;
        fs::rename(&tmp, &dir)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    }
    unpacked(&cache, &choice.release)
}

/// The private apt directory of `arch` (amd64's keeps its old name).
pub fn apt_dir(arch: Arch) -> Result<PathBuf> {
    Ok(match arch {
        Arch::Amd64 => cache_dir()?.join("apt"),
        other => cache_dir()?.join(format!("apt-{}", other.deb())),
    })
}

fn unpacked(cache: &Path, release: &str) -> Result<Kernel> {
    let root = cache.join(release);
    let vmlinuz = [
        root.join("boot").join(format!("vmlinuz-{release}")),
        root.join("usr/lib/modules").join(release).join("vmlinuz"),
        root.join("lib/modules").join(release).join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .with_context(|| format!("no vmlinuz in {}", root.display()))?;
    Ok(Kernel {
        release: release.to_string(),
        vmlinuz,
        root,
    })
}

/// The newest completely unpacked kernel in the cache that matches `want`.
fn cached(cache: &Path, want: &Want) -> Result<Option<String>> {
    let mut best: Option<(Key, String)> = None;
    for entry in fs::read_dir(cache)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.path().join(".complete").exists() {
            continue;
        }
        if let Some(key) = release_key(&name, want.arch).filter(|k| want.matches(k)) {
            if best.as_ref().is_none_or(|(b, _)| key > *b) {
                best = Some((key, name));
            }
        }
    }
    Ok(best.map(|(_, n)| n))
}

fn has_deb(dir: &Path, pkg: &str) -> Result<bool> {
    Ok(find_deb(dir, pkg).is_ok())
}

fn find_deb(dir: &Path, pkg: &str) -> Result<PathBuf> {
    let prefix = format!("{pkg}_");
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(entry.path());
        }
    }
    bail!("{pkg} was not downloaded to {}", dir.display())
}

/// A requested version: `5.10` (major and minor) or `7` / `7.x` (any minor of that major).
#[derive(Debug, PartialEq)]
struct Want {
    major: u32,
    minor: Option<u32>,
    arch: Arch,
}

impl Want {
    fn parse(s: &str, arch: Arch) -> Result<Want> {
        let s = s.strip_suffix(".x").unwrap_or(s);
        let mut parts = s.split('.');
        let major = parts
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("kernel version {s:?}: expected MAJOR.MINOR or MAJOR"))?;
        let minor = match parts.next() {
            None => None,
            Some(p) => Some(
                p.parse()
                    .with_context(|| format!("kernel version {s:?}: bad minor"))?,
            ),
        };
        if parts.next().is_some() {
            bail!("kernel version {s:?}: give MAJOR.MINOR (the newest of that series is used)");
        }
        Ok(Want { major, minor, arch })
    }

    fn matches(&self, key: &Key) -> bool {
        key.0 == self.major && self.minor.is_none_or(|m| key.1 == m)
    }
}

/// (major, minor, patch, Debian ABI number) of a kernel release, for picking the newest.
type Key = (u32, u32, u32, u32);

/// `5.10.0-46-cloud-amd64` -> (5, 10, 0, 46); `6.12.117+deb12-cloud-amd64` -> (6, 12, 117, 0)
/// (`-cloud-arm64` for arm64). Backports (`6.1.0-0.deb11.48-cloud-amd64`) and other flavours
/// are not ours: None.
fn release_key(release: &str, arch: Arch) -> Option<Key> {
    let version = release.strip_suffix(&format!("-cloud-{}", arch.deb()))?;
    let (numbers, abi) = match version.split_once('-') {
        Some((n, abi)) => (n, abi.parse().ok()?),
        None => (version.split_once('+')?.0, 0),
    };
    let mut it = numbers.split('.').map(|p| p.parse::<u32>().ok());
    let key = (it.next()??, it.next()??, it.next()??, abi);
    it.next().is_none().then_some(key)
}

/// The packages that make up one kernel, and its release.
#[derive(Debug, PartialEq)]
struct Choice {
    release: String,
    packages: Vec<String>,
}

/// The newest kernel in `names` (apt's package names) matching `want`.
fn choose(names: &[String], want: &Want) -> Option<Choice> {
    let mut best: Option<(Key, Choice)> = None;
    for name in names {
        let (release, packages) = if let Some(r) = name.strip_prefix("linux-image-") {
            (r, vec![name.clone()])
        } else if let Some(r) = name.strip_prefix("linux-binary-") {
            // The split packaging (7.x): image and modules come separately.
            let modules = format!("linux-modules-{r}");
            if !names.contains(&modules) {
                continue;
            }
            (r, vec![name.clone(), modules])
        } else {
            continue;
        };
        let Some(key) = release_key(release, want.arch).filter(|k| want.matches(k)) else {
            continue;
        };
        // A release with both forms: the split one is what the suite builds now.
        if best
            .as_ref()
            .is_none_or(|(b, c)| key > *b || (key == *b && packages.len() > c.packages.len()))
        {
            best = Some((
                key,
                Choice {
                    release: release.to_string(),
                    packages,
                },
            ));
        }
    }
    best.map(|(_, c)| c)
}

/// apt with its own configuration, state and cache under `dir`.
pub struct Apt {
    conf: PathBuf,
    lists: PathBuf,
}

impl Apt {
    /// The private configuration for `arch`'s packages under `dir`.
    pub fn new(dir: &Path, arch: Arch) -> Result<Apt> {
        let etc = dir.join("etc");
        for d in [
            etc.join("sources.list.d"),
            etc.join("preferences.d"),
            dir.join("state/lists/partial"),
            dir.join("cache/archives/partial"),
        ] {
            fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        fs::write(etc.join("sources.list"), SOURCES)?;
        let status = dir.join("status");
        if !status.exists() {
            fs::write(&status, "")?;
        }
        let d = dir.display();
        let conf = dir.join("apt.conf");
        fs::write(
            &conf,
            format!(
                "Dir::Etc::SourceList \"{d}/etc/sources.list\";\n\
                 Dir::Etc::SourceParts \"{d}/etc/sources.list.d\";\n\
                 Dir::Etc::Preferences \"{d}/etc/preferences\";\n\
                 Dir::Etc::PreferencesParts \"{d}/etc/preferences.d\";\n\
                 Dir::State \"{d}/state\";\n\
                 Dir::State::status \"{d}/status\";\n\
                 Dir::Cache \"{d}/cache\";\n\
                 APT::Architecture \"{a}\";\n\
                 APT::Architectures {{ \"{a}\"; }};\n\
                 Acquire::Languages \"none\";\n\
                 Acquire::IndexTargets::deb::DEP-11::DefaultEnabled \"false\";\n\
                 Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled \"false\";\n",
                a = arch.deb()
            ),
        )?;
        Ok(Apt {
            conf,
            lists: dir.join("state/lists"),
        })
    }

    fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", &self.conf)
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    /// Whether the sid list is missing or older than [`LISTS_MAX_AGE`].
    pub fn lists_stale(&self) -> bool {
        let newest = fs::read_dir(&self.lists).ok().and_then(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().contains("_Packages"))
                .filter_map(|e| e.metadata().ok()?.modified().ok())
                .min()
        });
        newest.is_none_or(|t| {
            SystemTime::now()
                .duration_since(t)
                .is_ok_and(|age| age > LISTS_MAX_AGE)
        })
    }

    pub fn update(&self) -> Result<()> {
        eprintln!("vm: apt-get update (private configuration: bookworm, bookworm-security, bullseye-security, sid)");
        output(self.cmd("apt-get").args(["update", "-q"])).map(|_| ())
    }

    fn package_names(&self) -> Result<Vec<String>> {
        let out = output(self.cmd("apt-cache").args(["pkgnames", "linux-"]))?;
        Ok(out.lines().map(str::to_string).collect())
    }

    pub fn download(&self, dir: &Path, pkg: &str) -> Result<()> {
        output(
            self.cmd("apt-get")
                .current_dir(dir)
                .args(["download", "-q", pkg]),
        )
        .map(|_| ())
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.release)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release_key_amd64(r: &str) -> Option<Key> {
        release_key(r, Arch::Amd64)
    }

    #[test]
    fn release_keys() {
        assert_eq!(
            release_key("6.1.0-56-cloud-arm64", Arch::Arm64),
            Some((6, 1, 0, 56))
        );
        assert_eq!(release_key("6.1.0-56-cloud-arm64", Arch::Amd64), None);
        assert_eq!(
            release_key_amd64("5.10.0-46-cloud-amd64"),
            Some((5, 10, 0, 46))
        );
        assert_eq!(
            release_key_amd64("6.1.0-56-cloud-amd64"),
            Some((6, 1, 0, 56))
        );
        assert_eq!(
            release_key_amd64("6.12.117+deb12-cloud-amd64"),
            Some((6, 12, 117, 0))
        );
        assert_eq!(
            release_key_amd64("7.2.13+deb14-cloud-amd64"),
            Some((7, 2, 13, 0))
        );
        assert_eq!(release_key_amd64("6.1.0-0.deb11.48-cloud-amd64"), None);
        assert_eq!(release_key_amd64("6.1-cloud-amd64"), None);
        assert_eq!(release_key_amd64("cloud-amd64"), None);
        assert_eq!(release_key_amd64("6.1.0-56-amd64"), None);
        assert_eq!(
            release_key_amd64("6.12.117+deb12-cloud-amd64-unsigned"),
            None
        );
    }

    #[test]
    fn wants() {
        assert_eq!(
            Want::parse("5.10", Arch::Amd64).unwrap(),
            Want {
                major: 5,
                minor: Some(10),
                arch: Arch::Amd64
            }
        );
        assert_eq!(
            Want::parse("7.x", Arch::Amd64).unwrap(),
            Want {
                major: 7,
                minor: None,
                arch: Arch::Amd64
            }
        );
        assert_eq!(
            Want::parse("7", Arch::Amd64).unwrap(),
            Want {
                major: 7,
                minor: None,
                arch: Arch::Amd64
            }
        );
        assert!(Want::parse("6.1.3", Arch::Amd64).is_err());
        assert!(Want::parse("six", Arch::Amd64).is_err());
    }

    #[test]
    fn chooses_the_newest_of_a_series() {
        let names: Vec<String> = [
            "linux-image-5.10.0-43-cloud-amd64",
            "linux-image-5.10.0-46-cloud-amd64",
            "linux-image-5.10.0-46-cloud-amd64-dbg",
            "linux-image-6.1.0-0.deb11.52-cloud-amd64",
            "linux-image-6.1.0-9-cloud-amd64",
            "linux-image-6.1.0-56-cloud-amd64",
            "linux-image-6.1-cloud-amd64",
            "linux-image-6.12.99+deb12-cloud-amd64",
            "linux-image-6.12.117+deb12-cloud-amd64",
            "linux-image-7.2.13+deb14-cloud-amd64",
            "linux-binary-7.2.13+deb14-cloud-amd64",
            "linux-modules-7.2.13+deb14-cloud-amd64",
            "linux-binary-7.3.1+deb14-cloud-amd64",
        ]
        .map(String::from)
        .to_vec();
        let pick = |v: &str| choose(&names, &Want::parse(v, Arch::Amd64).unwrap());
        assert_eq!(
            pick("5.10").unwrap().packages,
            ["linux-image-5.10.0-46-cloud-amd64"]
        );
        assert_eq!(pick("6.1").unwrap().release, "6.1.0-56-cloud-amd64");
        assert_eq!(pick("6.12").unwrap().release, "6.12.117+deb12-cloud-amd64");
        // 7.3.1 has no modules package: not bootable with veth.
        let seven = pick("7").unwrap();
        assert_eq!(seven.release, "7.2.13+deb14-cloud-amd64");
        assert_eq!(
            seven.packages,
            [
                "linux-binary-7.2.13+deb14-cloud-amd64",
                "linux-modules-7.2.13+deb14-cloud-amd64"
            ]
        );
        assert!(pick("4.19").is_none());
    }
}
