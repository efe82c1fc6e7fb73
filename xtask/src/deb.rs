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

use crate::util::{cargo, output, path_with_cargo_bin, run, workspace_root};

/// The command: setup, build, package; prints the .deb's path on stdout.
pub fn command(output_dir: Option<PathBuf>) -> Result<()> {
    crate::setup::run()?;
    let deb = build(output_dir)?;
    println!("{}", deb.display());
    Ok(())
}

const CONTROL: &str = "\
Package: spliced
Version: {version}
Architecture: {arch}
Maintainer: spliced maintainers <spliced@localhost>
Installed-Size: {size}
Depends: libc6, adduser
Section: net
Priority: optional
Description: TCP forwarder that splices connections inside the kernel
 spliced accepts TCP connections and forwards each to an upstream (IPv4, IPv6, link-local
 addresses with their interface, host names). An eBPF sk_skb verdict program moves the bytes
 socket to socket in the kernel (sockmap); splice(2) and copy paths are the fallbacks.
 systemd unit with readiness notification, socket activation and reload; status over a
 Unix socket; Prometheus metrics.
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

const POSTRM: &str = "\
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
";

const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: spliced
License: MIT or Apache-2.0
";

/// Builds the package into `output_dir` (default `target/deb`) and returns its path.
pub fn build(output_dir: Option<PathBuf>) -> Result<PathBuf> {
    let root = workspace_root();
    let bin = crate::build::build_spliced(true)?;
    let man = manpage(&root)?;
    let version = env!("CARGO_PKG_VERSION");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_owned();
    let out = output_dir.unwrap_or_else(|| root.join("target/deb"));
    let stage = root.join(format!("target/deb-stage/spliced_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let put = |rel: &str, bytes: &[u8], mode: u32| -> Result<()> {
        let path = stage.join(rel);
        fs::create_dir_all(path.parent().context("a file has a directory")?)?;
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    let read = |p: &Path| fs::read(p).with_context(|| format!("reading {}", p.display()));
    put("usr/bin/spliced", &read(&bin)?, 0o755)?;
    put(
        "lib/systemd/system/spliced.service",
        &read(&root.join("packaging/spliced.service"))?,
        0o644,
    )?;
    put(
        "etc/spliced/spliced.toml",
        &read(&root.join("packaging/spliced.toml"))?,
        0o644,
    )?;
    put("usr/share/man/man8/spliced.8.gz", &gzip(&man)?, 0o644)?;
    put(
        "usr/share/doc/spliced/README.md",
        &read(&root.join("README.md"))?,
        0o644,
    )?;
    put(
        "usr/share/doc/spliced/copyright",
        COPYRIGHT.as_bytes(),
        0o644,
    )?;
    let size_kib = du_kib(&stage)?;
    let control = CONTROL
        .replace("{version}", version)
        .replace("{arch}", &arch)
        .replace("{size}", &size_kib.to_string());
    put("DEBIAN/control", control.as_bytes(), 0o644)?;
    put("DEBIAN/conffiles", b"/etc/spliced/spliced.toml\n", 0o644)?;
    put("DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    put("DEBIAN/prerm", PRERM.as_bytes(), 0o755)?;
    put("DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;
    // Directories 0755 whatever the umask.
    set_dir_modes(&stage)?;
    fs::create_dir_all(&out)?;
    let deb = out.join(format!("spliced_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    Ok(deb)
}

/// spliced(8) in roff, from the clap definitions.
fn manpage(root: &Path) -> Result<Vec<u8>> {
    let mut cmd = cargo();
    // The same environment as the release build, so the library is not rebuilt.
    cmd.current_dir(root)
        .env("SPLICED_REQUIRE_EBPF", "1")
        .env("PATH", path_with_cargo_bin()?)
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "proxy-user",
            "--example",
            "manpage",
        ]);
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
