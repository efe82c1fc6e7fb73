//! bpf-linker built against the nightly toolchain's own LLVM (see the toolchain notes): Debian 12
//! has no LLVM recent enough, and no prebuilt bpf-linker can be downloaded here.
//!
//! The binary carries a runpath to `~/.cache/spliced/rust-llvm/lib`, where two symlinks point
//! at the nightly sysroot's `libLLVM.so.<major>.<minor>-rust-<version>`. A new nightly breaks
//! them; relinking fixes that as long as the LLVM major is the same, otherwise we rebuild.
use std::{
    fs, io,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use super::{report, Outcome};
use crate::util::{cargo, cargo_bin_dir, home_dir, run};

/// The version the eBPF build is known to work with.
const VERSION: &str = "0.13.0";

/// Makes sure `bpf-linker` 0.13.0 runs on its own (outside cargo), relinking or rebuilding it.
pub fn ensure(nightly_sysroot: &Path) -> Result<()> {
    let bin = cargo_bin_dir()?.join("bpf-linker");
    let thing = format!("bpf-linker {VERSION}");
    if works(&bin) {
        report(&thing, &Outcome::Ok);
        return Ok(());
    }
    let prefix = home_dir()?.join(".cache/spliced/rust-llvm");
    let llvm = RustLlvm::find(nightly_sysroot)?;
    llvm.link_into(&prefix.join("lib"))?;
    if works(&bin) {
        report(
            &thing,
            &Outcome::Installed(format!("relinked to {}", llvm.file_name)),
        );
        return Ok(());
    }
    let feature = format!("llvm-{}", llvm.major);
    eprintln!(
        "setup: building bpf-linker {VERSION} against {} (about a minute)",
        llvm.file_name
    );
    run(cargo()
        .args(["install", &format!("bpf-linker@{VERSION}")])
        .args([
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &feature,
        ])
        .env("LLVM_PREFIX", &prefix))?;
    if !works(&bin) {
        bail!(
            "{} was installed but `{} --version` does not print {VERSION}",
            thing,
            bin.display()
        );
    }
    report(&thing, &Outcome::Installed(format!("built with {feature}")));
    Ok(())
}

/// Whether `bin --version` prints our version when run by hand: without the `LD_LIBRARY_PATH`
/// that cargo and rustup add, which would hide a broken runpath.
fn works(bin: &Path) -> bool {
    Command::new(bin)
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .any(|w| w == VERSION)
        })
}

/// The LLVM shared library that ships with the nightly toolchain.
struct RustLlvm {
    path: PathBuf,
    /// `libLLVM.so.22.1-rust-1.97.0-nightly`: the soname bpf-linker asks for.
    file_name: String,
    /// `22`: picks bpf-linker's `llvm-22` feature.
    major: u32,
}

impl RustLlvm {
    fn find(sysroot: &Path) -> Result<Self> {
        let lib = sysroot.join("lib");
        let entries =
            fs::read_dir(&lib).with_context(|| format!("cannot list {}", lib.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", lib.display()))?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if let Some(major) = parse_major(&file_name) {
                return Ok(Self {
                    path: entry.path(),
                    file_name,
                    major,
                });
            }
        }
        bail!(
            "no libLLVM.so.<version>-rust-* in {}; is the nightly toolchain complete?",
            lib.display()
        )
    }

    /// Points `dir/<soname>` and `dir/libLLVM.so` at the library, dropping links to older ones.
    fn link_into(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != self.file_name && name != "libLLVM.so" && name.starts_with("libLLVM") {
                remove_if_present(&entry.path())?;
            }
        }
        for name in [self.file_name.as_str(), "libLLVM.so"] {
            replace_symlink(&self.path, &dir.join(name))?;
        }
        Ok(())
    }
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> 22.
fn parse_major(file_name: &str) -> Option<u32> {
    let version = file_name.strip_prefix("libLLVM.so.")?;
    if !version.contains("-rust-") {
        return None;
    }
    version.split(['.', '-']).next()?.parse().ok()
}

/// Makes `link` point at `target`, atomically (a concurrent build never sees it missing).
fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    let tmp = link.with_extension(format!("tmp{}", std::process::id()));
    remove_if_present(&tmp)?;
    symlink(target, &tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    fs::rename(&tmp, link).with_context(|| format!("cannot replace {}", link.display()))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_major;

    #[test]
    fn llvm_major_comes_from_the_file_name() {
        assert_eq!(parse_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(parse_major("libLLVM.so.23-rust-1.99.0-nightly"), Some(23));
        assert_eq!(parse_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
        assert_eq!(parse_major("libLLVM.so"), None);
    }
}
