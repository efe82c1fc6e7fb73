//! Boots one kernel and initramfs in QEMU under TCG (never KVM: it does not work for these
//! guests on these machines), waits for the guest to power off, and reads the outcome from the
//! serial console. QEMU is killed when the time limit passes and whenever this returns early.
use std::{
    fs,
    io::{Read as _, Seek as _, SeekFrom},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::arch::Arch;

/// Kills and reaps QEMU unless it already exited.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Boots `vmlinuz` with `initrd`, the console going to `console`; returns the console's text
/// once QEMU exits (the guest's `poweroff`, or a panic with `-no-reboot`). Lines worth
/// following live (markers, test results, failures) are echoed to stderr with `prefix`.
pub fn boot(
    (arch, mem_mib): (Arch, u32),
    vmlinuz: &Path,
    initrd: &Path,
    console: &Path,
    limit: Duration,
    prefix: &str,
) -> Result<String> {
    let _ = fs::remove_file(console);
    let (machine, tty) = arch.qemu_machine();
    let mut cmd = Command::new(arch.qemu());
    cmd.args(["-accel", "tcg"])
        .args(machine)
        .args(["-smp", "2", "-m"])
        .arg(mem_mib.to_string())
        .args(["-display", "none", "-monitor", "none", "-nic", "none"])
        .args(["-no-reboot", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console={tty} panic=-1 quiet"))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe; between fork and exec it only sets a process flag.
    unsafe {
        cmd.pre_exec(|| {
            // QEMU dies with xtask, also when xtask is killed (a CI timeout) and no drop runs.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", arch.qemu()))?;
    let mut guard = Guard(child);
    let started = Instant::now();
    let mut echoed = 0u64;
    let mut partial = String::new();
    loop {
        echo_new(console, &mut echoed, &mut partial, prefix);
        if let Some(status) = guard.0.try_wait()? {
            echo_new(console, &mut echoed, &mut partial, prefix);
            let mut err = String::new();
            if let Some(mut e) = guard.0.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            if !status.success() {
                bail!("qemu exited with {status}: {}", err.trim());
            }
            break;
        }
        if started.elapsed() > limit {
            // Guard's drop kills it.
            bail!("the guest did not power off within {limit:?}; QEMU killed");
        }
        thread::sleep(Duration::from_millis(500));
    }
    let bytes = fs::read(console).with_context(|| format!("cannot read {}", console.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Prints the console lines added since the last call that a person following the run wants.
fn echo_new(console: &Path, offset: &mut u64, partial: &mut String, prefix: &str) {
    let Ok(mut f) = fs::File::open(console) else {
        return;
    };
    if f.seek(SeekFrom::Start(*offset)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return;
    }
    *offset += buf.len() as u64;
    partial.push_str(&String::from_utf8_lossy(&buf));
    while let Some(at) = partial.find('\n') {
        let line: String = partial.drain(..=at).collect();
        let line = line.trim_end();
        if line.contains("SPLICED-VM:")
            || line.contains("SPLICED-SYSTEM:")
            || line.starts_with("test result:")
            || line.contains("FAILED")
            || line.contains("panicked")
            || line.contains("Kernel panic")
        {
            eprintln!("{prefix}{line}");
        }
    }
}

/// The kernel image QEMU can load. amd64's bzImage and arm64's gzip-compressed `Image` load as
/// they are; an arm64 EFI zboot image (`zimg` in its header: a PE stub around a compressed
/// `Image`, which QEMU 7.2's `-kernel` cannot boot) is unpacked into `work` first.
pub fn loadable_kernel(arch: Arch, vmlinuz: &Path, work: &Path) -> Result<std::path::PathBuf> {
    if arch != Arch::Arm64 {
        return Ok(vmlinuz.to_path_buf());
    }
    let bytes = fs::read(vmlinuz).with_context(|| format!("cannot read {}", vmlinuz.display()))?;
    // The zboot header: "MZ", 2 bytes, "zimg", payload offset and size (le32), 28 bytes of
    // padding, the compression type as a NUL-terminated string.
    if bytes.len() < 64 || &bytes[4..8] != b"zimg" {
        return Ok(vmlinuz.to_path_buf());
    }
    let le32 = |at: usize| {
        u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
    };
    let (offset, size) = (le32(8), le32(12));
    let kind: String = bytes[24..56]
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    let payload = bytes
        .get(offset..offset + size)
        .context("the zboot payload lies outside the file")?;
    let tool = match kind.as_str() {
        "gzip" => "gzip",
        "zstd" => "zstd",
        "xz" => "xz",
        other => bail!("zboot image compressed with {other}: not supported"),
    };
    let packed = work.join("Image.packed");
    fs::write(&packed, payload)?;
    let out = Command::new(tool)
        .args(["-d", "-c"])
        .arg(&packed)
        .output()
        .with_context(|| format!("cannot run {tool}"))?;
    if !out.status.success() {
        bail!("{tool} -d of the zboot payload failed");
    }
    let image = work.join("Image");
    fs::write(&image, out.stdout)?;
    Ok(image)
}
