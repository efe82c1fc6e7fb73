//! `cargo xtask deb [--output DIR]`: a Debian package of spliced, built with `dpkg-deb` only
//! (no cargo-deb to install): the release binary, the systemd unit, an example
//! `/etc/spliced/spliced.toml` (a conffile), the man page spliced(8) generated from the clap
//! definitions (`proxy-user/examples/manpage.rs`), the README; a postinst that creates the
//! system user `spliced` the example configuration drops to.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    arch::Arch,
    util::{run, workspace_root},
};

/// The command: setup, build, package; prints the .deb's path on stdout.
pub fn command(arch: Arch, output_dir: Option<PathBuf>) -> Result<()> {
    crate::setup::run()?;
    crate::setup::cross(arch)?;
    let deb = build(arch, output_dir)?;
    println!("{}", deb.display());
    Ok(())
}

const CONTROL: &str = "\
Package: spliced
Version: {version}
Architecture: {arch}
Maintainer: spliced maintainers <spliced@localhost>
Installed-Size: {size}
Depends: {depends}
Section: net
Priority: optional
Description: TCP forwarder that splices connections inside the kernel
 spliced accepts TCP connections and forwards each to an upstream (IPv4, IPv6, link-local
 addresses with their interface, host names). An eBPF sk_skb verdict program moves the bytes
 socket to socket in the kernel (sockmap); splice(2) and copy paths are the fallbacks.
 systemd unit with readiness notification, socket activation and reload; status over a
 Unix socket; Prometheus metrics.
";

const DBGSYM_CONTROL: &str = "\
Package: spliced-dbgsym
Source: spliced
Version: {version}
Architecture: {arch}
Maintainer: spliced maintainers <spliced@localhost>
Installed-Size: {size}
Depends: spliced (= {version})
Section: debug
Priority: optional
Auto-Built-Package: debug-symbols
Build-Ids: {build_id}
Description: debug symbols for spliced
";

const POSTINST: &str = "\
#!/bin/sh
set -e
if [ \"$1\" = configure ]; then
    if ! getent passwd spliced >/dev/null; then
        adduser --system --group --no-create-home --home /nonexistent --quiet spliced
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
    fi
fi
";

const PRERM: &str = "\
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ \"$1\" = remove ]; then
    systemctl stop spliced.service >/dev/null 2>&1 || true
fi
";

/// On purge, `systemctl enable` links to the removed unit go too (dpkg removes the conffile
/// and `/etc/spliced`); the system user stays, as Debian policy asks.
const POSTRM: &str = "\
#!/bin/sh
set -e
if [ \"$1\" = purge ] && [ -d /etc/systemd/system ]; then
    find /etc/systemd/system -type l -lname '*/spliced.service' -delete
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
";

const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: spliced
License: MIT or Apache-2.0
";

/// Builds the packages for `arch` into `output_dir` (default `target/deb`): `spliced` and
/// `spliced-dbgsym` (the debug info the package's binary was stripped of, found by debuggers
/// through its build ID). Returns the main package's path.
pub fn build(arch: Arch, output_dir: Option<PathBuf>) -> Result<PathBuf> {
    let root = workspace_root();
    let bin = crate::repro::build_release(arch)?;
    let man = manpage()?;
    let version = env!("CARGO_PKG_VERSION");
    let epoch = crate::repro::source_date_epoch(&root)?;
    let out = output_dir.unwrap_or_else(|| root.join("target/deb"));
    let stages = root.join(format!("target/deb-stage/{}", arch.deb()));
    if stages.exists() {
        fs::remove_dir_all(&stages).with_context(|| format!("removing {}", stages.display()))?;
    }
    let split = crate::repro::split_debug(arch, &bin, &stages.join("split"))?;
    let stage = stages.join("spliced");
    let mut s = Stage::new(&stage);
    s.put("usr/bin/spliced", &split.stripped, 0o755)?;
    s.copy(
        "lib/systemd/system/spliced.service",
        &root.join("packaging/spliced.service"),
    )?;
    s.copy(
        "etc/spliced/spliced.toml",
        &root.join("packaging/spliced.toml"),
    )?;
    s.copy(
        "usr/share/doc/spliced/examples/spliced.socket",
        &root.join("packaging/spliced.socket"),
    )?;
    s.put("usr/share/man/man8/spliced.8.gz", &gzip(&man)?, 0o644)?;
    s.copy("usr/share/doc/spliced/README.md", &root.join("README.md"))?;
    s.put(
        "usr/share/doc/spliced/copyright",
        COPYRIGHT.as_bytes(),
        0o644,
    )?;
    let control = CONTROL
        .replace("{version}", version)
        .replace("{arch}", arch.deb())
        .replace("{depends}", &crate::repro::depends(arch, &bin)?)
        .replace("{size}", &du_kib(&stage)?.to_string());
    s.put("DEBIAN/control", control.as_bytes(), 0o644)?;
    s.put("DEBIAN/conffiles", b"/etc/spliced/spliced.toml\n", 0o644)?;
    s.put("DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    s.put("DEBIAN/prerm", PRERM.as_bytes(), 0o755)?;
    s.put("DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;

    let dbg_stage = stages.join("spliced-dbgsym");
    let mut d = Stage::new(&dbg_stage);
    let (dir, file) = split.build_id.split_at(2);
    d.put(
        &format!("usr/lib/debug/.build-id/{dir}/{file}.debug"),
        &split.debug,
        0o644,
    )?;
    d.put(
        "usr/share/doc/spliced-dbgsym/copyright",
        COPYRIGHT.as_bytes(),
        0o644,
    )?;
    let control = DBGSYM_CONTROL
        .replace("{version}", version)
        .replace("{arch}", arch.deb())
        .replace("{build_id}", &split.build_id)
        .replace("{size}", &du_kib(&dbg_stage)?.to_string());
    d.put("DEBIAN/control", control.as_bytes(), 0o644)?;

    fs::create_dir_all(&out)?;
    let deb = out.join(format!("spliced_{version}_{}.deb", arch.deb()));
    dpkg_deb(&stage, &deb, &epoch)?;
    let dbg = out.join(format!("spliced-dbgsym_{version}_{}.deb", arch.deb()));
    dpkg_deb(&dbg_stage, &dbg, &epoch)?;
    eprintln!("deb: {} and {}", deb.display(), dbg.display());
    Ok(deb)
}

/// A package's staging tree.
struct Stage<'a> {
    root: &'a Path,
}

impl<'a> Stage<'a> {
    fn new(root: &'a Path) -> Stage<'a> {
        Stage { root }
    }

    fn put(&mut self, rel: &str, bytes: &[u8], mode: u32) -> Result<()> {
        let path = self.root.join(rel);
        fs::create_dir_all(path.parent().context("a file has a directory")?)?;
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    fn copy(&mut self, rel: &str, from: &Path) -> Result<()> {
        let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        self.put(rel, &bytes, 0o644)
    }
}

/// `dpkg-deb --build` made reproducible: directories 0755 whatever the umask, every time stamp
/// the commit's (dpkg-deb also clamps to `SOURCE_DATE_EPOCH`), owner root, members in name
/// order (dpkg-deb sorts them), xz in one thread.
fn dpkg_deb(stage: &Path, deb: &Path, epoch: &str) -> Result<()> {
    set_dir_modes(stage)?;
    run(Command::new("find")
        .arg(stage)
        .args(["-exec", "touch", "--no-dereference", "--date"])
        .arg(format!("@{epoch}"))
        .args(["{}", "+"]))?;
    run(Command::new("dpkg-deb")
        .env("SOURCE_DATE_EPOCH", epoch)
        .args([
            "--root-owner-group",
            "-Zxz",
            "-z9",
            "--threads-max=1",
            "--build",
        ])
        .arg(stage)
        .arg(deb))
}

/// spliced(8) in roff, from the clap definitions: the example run on the host (amd64) with the
/// amd64 package build's environment, so it shares that build's crates whatever `arch` is.
fn manpage() -> Result<Vec<u8>> {
    let (mut cmd, _) = crate::repro::cargo_for(Arch::Amd64)?;
    cmd.args([
        "run",
        "--quiet",
        "--release",
        "--locked",
        "-p",
        "proxy-user",
    ])
    .args(["--example", "manpage", "--target", Arch::Amd64.gnu_target()]);
    let out = cmd.output().context("running the manpage example")?;
    if !out.status.success() {
        bail!(
            "the manpage example failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// `gzip -9n`: no name or time stamp in the header, so the package is reproducible.
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting gzip")?;
    child
        .stdin
        .take()
        .context("gzip's stdin")?
        .write_all(bytes)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed: {}", out.status);
    }
    Ok(out.stdout)
}

fn du_kib(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            du_kib(&entry.path())? * 1024
        } else {
            meta.len()
        };
    }
    Ok(total.div_ceil(1024))
}

fn set_dir_modes(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.metadata()?.is_dir() {
            set_dir_modes(&entry.path())?;
        }
    }
    Ok(())
}
