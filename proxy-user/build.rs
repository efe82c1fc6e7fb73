//! Builds the eBPF object (`proxy-ebpf`) with the nightly toolchain and bpf-linker, so a plain
//! `cargo build` always embeds a fresh one.
//!
//! `AYA_BUILD_SKIP=1` writes an empty object instead (fast `cargo check`/`clippy`); so does a
//! machine without nightly `rust-src` or `bpf-linker`, with a warning, unless
//! `SPLICED_REQUIRE_EBPF=1` (set by `cargo xtask`) makes that an error. A binary with an empty
//! object runs on the splice or copy path and says why at start-up.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=SPLICED_REQUIRE_EBPF");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    // aya-build watches proxy-ebpf; the map types it shares live here.
    println!("cargo:rerun-if-changed=../proxy-common/src");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    // The objects of proxy-ebpf: the sockmap verdict, the XDP front, the accept steering.
    let stubs = [
        out_dir.join("proxy-ebpf"),
        out_dir.join("proxy-xdp"),
        out_dir.join("proxy-steer"),
    ];
    let write_stubs = || -> anyhow::Result<()> {
        for stub in &stubs {
            fs::write(stub, []).context("writing an empty eBPF object")?;
        }
        Ok(())
    };
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        return write_stubs();
    }
    if let Err(missing) = toolchain_ready() {
        if env::var("SPLICED_REQUIRE_EBPF").is_ok_and(|v| v == "1") {
            return Err(anyhow!(
                "cannot build the eBPF object: {missing}; run `cargo xtask setup`"
            ));
        }
        println!("cargo:warning=building spliced without its eBPF object: {missing}; run `cargo xtask setup`");
        return write_stubs();
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "proxy-ebpf")
        .ok_or_else(|| anyhow!("package proxy-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("proxy-ebpf has no manifest directory"))?
        .as_str()
        .to_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}

/// Whether nightly with `rust-src` and a working `bpf-linker` are there.
fn toolchain_ready() -> Result<(), String> {
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|o| o.status.success()) {
        return Err("bpf-linker is missing or broken".into());
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .map_err(|e| format!("rustup: {e}"))?;
    if !sysroot.status.success() {
        return Err("the nightly toolchain is not installed".into());
    }
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_owned();
    let src = PathBuf::from(sysroot).join("lib/rustlib/src/rust/library/core");
    if !src.exists() {
        return Err("nightly has no rust-src component".into());
    }
    Ok(())
}
