//! The free space a run needs, checked before it starts writing.
//!
//! A full `cargo xtask test` writes several GiB under `target/` and `~/.cache/spliced`; a disk
//! that fills up half way fails every later step with a linker's bus error or an I/O error that
//! names no cause, so the run says up front how much it needs and how much there is.
use std::path::Path;

use anyhow::{bail, Context as _, Result};

const GIB: u64 = 1 << 30;

/// Free bytes (for an unprivileged writer too) on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(path)
        .with_context(|| format!("cannot read the free space under {}", path.display()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Fails unless the filesystem holding `path` has `need_gib` GiB free; `what` says what writes
/// there.
pub fn ensure_free(path: &Path, need_gib: u64, what: &str) -> Result<()> {
    let free = free_bytes(path)?;
    check(free, need_gib, path, what)
}

fn check(free: u64, need_gib: u64, path: &Path, what: &str) -> Result<()> {
    let have = free as f64 / GIB as f64;
    if free < need_gib * GIB {
        bail!(
            "{what} needs about {need_gib} GiB free on the filesystem of {}, which has {have:.1} \
             GiB: free space there (old clones, `cargo clean`, `~/.cache/spliced`) or point \
             CARGO_TARGET_DIR at a bigger filesystem",
            path.display()
        );
    }
    eprintln!(
        "disk: {have:.1} GiB free under {} ({what} needs about {need_gib})",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_little_space_names_the_need_and_the_fix() {
        let err = check(GIB, 6, Path::new("/x/target"), "a full test run").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("needs about 6 GiB"), "{msg}");
        assert!(msg.contains("/x/target"), "{msg}");
        assert!(msg.contains("has 1.0 GiB"), "{msg}");
        assert!(msg.contains("CARGO_TARGET_DIR"), "{msg}");
        check(7 * GIB, 6, Path::new("/x"), "a full test run").unwrap();
    }

    #[test]
    fn reads_this_filesystem() {
        assert!(free_bytes(Path::new("/")).unwrap() > 0);
    }
}
