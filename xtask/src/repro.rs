//! The package's release build, made reproducible: the same commit gives the same bytes in any
//! checkout directory, at any time, for any user.
//!
//! - Its own target directory (`target/package`), so the flags below never invalidate the
//!   everyday build's (a wrapper change is a new compiler to cargo: everything rebuilds).
//! - Every rustc call, the eBPF crate's nested nightly build included, goes through a wrapper
//!   that adds `--remap-path-prefix` for the checkout, the target directory, `CARGO_HOME` and
//!   `RUSTUP_HOME` (build-std compiles `core` from rust-src there). A wrapper rather than
//!   `RUSTFLAGS` because aya-build sets `CARGO_ENCODED_RUSTFLAGS` for the nested build, which
//!   overrides any flags we pass, while `RUSTC_WRAPPER` reaches it.
//! - `SOURCE_DATE_EPOCH` is the commit's time (`git log -1 --format=%ct`).
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    arch::Arch,
    util::{cargo, home_dir, output, path_with_cargo_bin, workspace_root},
};

/// Where paths of the checkout appear in the binary and its debug info.
pub const SOURCE_PREFIX: &str = "/usr/src/spliced";

/// The commit's time, for `SOURCE_DATE_EPOCH`; `SOURCE_DATE_EPOCH` itself when set (a source
/// tarball without git).
pub fn source_date_epoch(root: &Path) -> Result<String> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(v);
        }
    }
    let t = output(
        Command::new("git")
            .current_dir(root)
            .args(["log", "-1", "--format=%ct"]),
    )
    .context("SOURCE_DATE_EPOCH is not set and git cannot give the commit's time")?;
    Ok(t.trim().to_string())
}

/// The `--remap-path-prefix` arguments, general before specific (rustc applies the last
/// matching one).
fn remaps(root: &Path, target_dir: &Path) -> Result<Vec<String>> {
    let home = home_dir()?;
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cargo"));
    let rustup_home = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".rustup"));
    let pairs = [
        (cargo_home, "/cargo".to_string()),
        (rustup_home, "/rustup".to_string()),
        (root.to_path_buf(), SOURCE_PREFIX.to_string()),
        (target_dir.to_path_buf(), format!("{SOURCE_PREFIX}/target")),
    ];
    Ok(pairs
        .iter()
        .map(|(from, to)| format!("--remap-path-prefix={}={to}", from.display()))
        .collect())
}

/// Writes the rustc wrapper into `target_dir` and returns its path.
fn wrapper(root: &Path, target_dir: &Path) -> Result<PathBuf> {
    let mut script = String::from("#!/bin/sh\n# Written by cargo xtask deb: remaps paths.\n");
    script.push_str("rustc=\"$1\"\nshift\nexec \"$rustc\" \"$@\"");
    for r in remaps(root, target_dir)? {
        if r.contains('\'') {
            bail!("a path contains a single quote: {r}");
        }
        script.push_str(&format!(" '{r}'"));
    }
    script.push('\n');
    fs::create_dir_all(target_dir)?;
    let path = target_dir.join("remap-rustc");
    fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// `cargo` with the reproducible build's environment for `arch`, and its target directory.
pub fn cargo_for(arch: Arch) -> Result<(Command, PathBuf)> {
    let root = workspace_root();
    // `SPLICED_PACKAGE_TARGET_DIR` if set: the package test's second build, in a copy of the
    // checkout, shares the first one's dependencies (their paths are the same) and rebuilds only
    // the workspace's crates. Not `CARGO_TARGET_DIR`: the copy's own xtask binary would replace
    // this checkout's `target/debug/xtask`.
    let target_dir = std::env::var_os("SPLICED_PACKAGE_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/package"));
    let wrap = wrapper(&root, &target_dir)?;
    let mut cmd = cargo();
    cmd.current_dir(&root)
        .env("SPLICED_REQUIRE_EBPF", "1")
        .env("PATH", path_with_cargo_bin()?)
        .env("SOURCE_DATE_EPOCH", source_date_epoch(&root)?)
        .env("RUSTC_WRAPPER", &wrap)
        .env("CARGO_TARGET_DIR", &target_dir)
        .envs(arch.cargo_env());
    Ok((cmd, target_dir))
}

/// Builds the release `spliced` for `arch` reproducibly and returns the (unstripped) binary.
pub fn build_release(arch: Arch) -> Result<PathBuf> {
    let (mut cmd, target_dir) = cargo_for(arch)?;
    cmd.args(["build", "--release", "--locked", "-p", "proxy-user"])
        .args(["--bin", "spliced", "--target", arch.gnu_target()]);
    eprintln!("deb: building spliced for {} (reproducible)", arch.deb());
    crate::util::run(&mut cmd)?;
    let bin = target_dir.join(arch.gnu_target()).join("release/spliced");
    if !bin.is_file() {
        bail!("cargo built no {}", bin.display());
    }
    Ok(bin)
}

/// The binary without debug info and symbols, and its debug info alone; linked by the binary's
/// GNU build ID (`/usr/lib/debug/.build-id/xx/yyyy.debug`, as Debian's -dbgsym packages do).
pub struct Split {
    pub stripped: Vec<u8>,
    pub debug: Vec<u8>,
    /// The build ID in hex.
    pub build_id: String,
}

/// Splits `bin` with the architecture's objcopy and strip.
pub fn split_debug(arch: Arch, bin: &Path, work: &Path) -> Result<Split> {
    fs::create_dir_all(work)?;
    let debug = work.join("spliced.debug");
    let stripped = work.join("spliced.stripped");
    crate::util::run(
        arch.tool("objcopy")
            .args(["--only-keep-debug", "--compress-debug-sections=zlib"])
            .arg(bin)
            .arg(&debug),
    )?;
    crate::util::run(
        arch.tool("strip")
            .args(["--strip-all", "--remove-section=.comment", "-o"])
            .arg(&stripped)
            .arg(bin),
    )?;
    let notes = output(arch.tool("readelf").arg("-n").arg(&stripped))?;
    let build_id = notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .map(str::to_string)
        .context("the binary has no GNU build ID (is the linker gcc?)")?;
    Ok(Split {
        stripped: fs::read(&stripped)?,
        debug: fs::read(&debug)?,
        build_id,
    })
}

/// `Depends:` for a binary from its `NEEDED` libraries and the newest glibc symbol version it
/// uses (what dpkg-shlibdeps would find for these two libraries).
pub fn depends(arch: Arch, bin: &Path) -> Result<String> {
    let dynamic = output(arch.tool("readelf").args(["-d", "-W"]).arg(bin))?;
    let symbols = output(arch.tool("readelf").args(["--dyn-syms", "-W"]).arg(bin))?;
    let glibc = newest_glibc(&symbols).context("no GLIBC_ symbol versions in the binary")?;
    let mut deps = vec![format!("libc6 (>= {glibc})")];
    for line in dynamic.lines().filter(|l| l.contains("(NEEDED)")) {
        let lib = line.rsplit('[').next().unwrap_or("").trim_end_matches(']');
        match lib {
            "libgcc_s.so.1" => deps.push("libgcc-s1 (>= 4.2)".into()),
            l if [
                "libc.so.6",
                "libm.so.6",
                "libpthread.so.0",
                "libdl.so.2",
                "librt.so.1",
            ]
            .contains(&l)
                || l.starts_with("ld-linux") => {}
            other => bail!("the binary needs {other}: add its package to Depends"),
        }
    }
    deps.push("adduser".into());
    Ok(deps.join(", "))
}

/// The highest `GLIBC_x.y[.z]` in `readelf --dyn-syms` output.
fn newest_glibc(symbols: &str) -> Option<String> {
    let mut best: Option<Vec<u32>> = None;
    for word in symbols.split(|c: char| c.is_whitespace() || c == '@') {
        let Some(v) = word.strip_prefix("GLIBC_") else {
            continue;
        };
        let Some(parts) = v
            .split(['.', ' '])
            .map(|p| p.parse::<u32>().ok())
            .collect::<Option<Vec<u32>>>()
        else {
            continue;
        };
        if best.as_ref().is_none_or(|b| parts > *b) {
            best = Some(parts);
        }
    }
    best.map(|b| b.iter().map(u32::to_string).collect::<Vec<_>>().join("."))
}

#[cfg(test)]
mod tests {
    use super::newest_glibc;

    #[test]
    fn newest_glibc_version() {
        let syms = "   1: 0 FUNC GLOBAL DEFAULT UND memcpy@GLIBC_2.14 (2)\n\
                    2: 0 FUNC GLOBAL DEFAULT UND gettid@GLIBC_2.30 (3)\n\
                    3: 0 FUNC GLOBAL DEFAULT UND free@GLIBC_2.2.5 (4)\n\
                    4: 0 FUNC GLOBAL DEFAULT UND x@GLIBC_PRIVATE (5)\n";
        assert_eq!(newest_glibc(syms).as_deref(), Some("2.30"));
        assert_eq!(newest_glibc("nothing"), None);
    }
}
