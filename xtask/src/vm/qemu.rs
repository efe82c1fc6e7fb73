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
    vmlinuz: &Path,
    initrd: &Path,
    console: &Path,
    limit: Duration,
    prefix: &str,
) -> Result<String> {
    let _ = fs::remove_file(console);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1024"])
        .args(["-display", "none", "-monitor", "none", "-nic", "none"])
        .args(["-no-reboot", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
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
    let child = cmd.spawn().context("cannot start qemu-system-x86_64")?;
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
            || line.starts_with("test result:")
            || line.contains("FAILED")
            || line.contains("panicked")
            || line.contains("Kernel panic")
        {
            eprintln!("{prefix}{line}");
        }
    }
}
