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

/// One guest to boot: what, with how much memory, and how long to wait for it.
pub struct Guest<'a> {
    pub arch: Arch,
    pub mem_mib: u32,
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    /// Where the serial console goes.
    pub console: &'a Path,
    /// The kernel's boot messages on the console (else `quiet`); the guest's init lowers the
    /// level again before its own output.
    pub boot_log: bool,
    /// Boot to power-off.
    pub limit: Duration,
    /// How long the guest may go without a marker line before it counts as hung in its boot.
    pub silent: Duration,
    /// Put before every line echoed to stderr.
    pub prefix: &'a str,
}

/// How one boot ended.
enum Ended {
    /// QEMU exited; the console's text.
    Off(String),
    /// No marker within [`Guest::silent`]; QEMU killed.
    Silent,
}

/// Boots the guest and returns the console's text once QEMU exits (the guest's `poweroff`, or
/// a panic with `-no-reboot`). A guest that printed no marker within its silence limit is
/// booted once more: a 7.2 amd64 guest under TCG beside the arm64 one printed nothing in 600 s
/// once (CI, 2026-12-01), where boots measured that day had their first marker in 4.5-7 s.
/// The retry cannot hide a fault of spliced's: nothing of it runs before the first marker.
pub fn boot(guest: &Guest) -> Result<String> {
    for attempt in 1..=2 {
        match boot_once(guest)? {
            Ended::Off(text) => return Ok(text),
            Ended::Silent => {
                eprintln!(
                    "{}no marker within {:?} of boot (attempt {attempt} of 2); the console ends:",
                    guest.prefix, guest.silent
                );
                print_tail(guest.console, guest.prefix);
            }
        }
    }
    bail!(
        "the guest printed no marker within {:?} of boot, twice (a hang in the kernel's boot \
         or before the init's first line; the console ends as printed above)",
        guest.silent
    )
}

/// One boot. Lines worth following live (markers, test results, failures) are echoed to stderr
/// with the guest's prefix, and when the first marker came.
fn boot_once(guest: &Guest) -> Result<Ended> {
    let _ = fs::remove_file(guest.console);
    let mut guard = Guard(spawn(guest)?);
    let started = Instant::now();
    let mut echo = Echo::default();
    loop {
        echo.new_lines(guest.console, guest.prefix, started);
        if let Some(status) = guard.0.try_wait()? {
            echo.new_lines(guest.console, guest.prefix, started);
            let mut err = String::new();
            if let Some(mut e) = guard.0.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            if !status.success() {
                bail!("qemu exited with {status}: {}", err.trim());
            }
            break;
        }
        // Guard's drop kills QEMU on both returns.
        if !echo.heard && started.elapsed() > guest.silent {
            return Ok(Ended::Silent);
        }
        if started.elapsed() > guest.limit {
            eprintln!("{}the console ends:", guest.prefix);
            print_tail(guest.console, guest.prefix);
            bail!(
                "the guest did not power off within {:?}; QEMU killed",
                guest.limit
            );
        }
        thread::sleep(Duration::from_millis(500));
    }
    let bytes = fs::read(guest.console)
        .with_context(|| format!("cannot read {}", guest.console.display()))?;
    Ok(Ended::Off(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Starts QEMU under TCG with the console going to a file.
fn spawn(guest: &Guest) -> Result<Child> {
    let arch = guest.arch;
    let (machine, tty) = arch.qemu_machine();
    let quiet = if guest.boot_log { "" } else { " quiet" };
    let mut cmd = Command::new(arch.qemu());
    cmd.args(["-accel", "tcg"])
        .args(machine)
        .args(["-smp", "2", "-m"])
        .arg(guest.mem_mib.to_string())
        .args(["-display", "none", "-monitor", "none", "-nic", "none"])
        .args(["-no-reboot", "-kernel"])
        .arg(guest.vmlinuz)
        .arg("-initrd")
        .arg(guest.initrd)
        .arg("-append")
        .arg(format!("console={tty} panic=-1{quiet}"))
        .arg("-serial")
        .arg(format!("file:{}", guest.console.display()))
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
    cmd.spawn()
        .with_context(|| format!("cannot start {}", arch.qemu()))
}

/// Prints the console's last lines: where a guest that hangs or runs out of time stopped (CI
/// keeps only what is printed).
fn print_tail(console: &Path, prefix: &str) {
    const LINES: usize = 25;
    let text = fs::read(console)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        eprintln!("{prefix}| (nothing: the console is empty)");
    }
    for line in &lines[lines.len().saturating_sub(LINES)..] {
        eprintln!("{prefix}| {}", line.trim_end());
    }
}

/// The console read so far.
#[derive(Default)]
struct Echo {
    offset: u64,
    partial: String,
    /// A marker line was seen.
    heard: bool,
}

impl Echo {
    /// Prints the console lines added since the last call that a person following the run
    /// wants, and the time of the first marker.
    fn new_lines(&mut self, console: &Path, prefix: &str, started: Instant) {
        let Ok(mut f) = fs::File::open(console) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        while let Some(at) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=at).collect();
            let line = line.trim_end();
            let marker = line.contains("SPLICED-VM:") || line.contains("SPLICED-SYSTEM:");
            if marker && !self.heard {
                self.heard = true;
                eprintln!(
                    "{prefix}first marker {:.1} s after QEMU started",
                    started.elapsed().as_secs_f64()
                );
            }
            if marker
                || line.starts_with("test result:")
                || line.contains("FAILED")
                || line.contains("panicked")
                || line.contains("Kernel panic")
            {
                eprintln!("{prefix}{line}");
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The first marker is noticed even when it arrives split over two reads, and kernel
    /// noise before it is not a marker.
    #[test]
    fn the_first_marker_is_heard_across_reads() {
        let path = std::env::temp_dir().join(format!("spliced-echo-{}.log", std::process::id()));
        let mut echo = Echo::default();
        fs::write(&path, "[    0.000000] Linux version 7.2\nSPLICED-VM: ker").unwrap();
        echo.new_lines(&path, "t: ", Instant::now());
        assert!(!echo.heard, "a partial line is not a marker yet");
        fs::write(
            &path,
            "[    0.000000] Linux version 7.2\nSPLICED-VM: kernel 7.2\n",
        )
        .unwrap();
        echo.new_lines(&path, "t: ", Instant::now());
        let _ = fs::remove_file(&path);
        assert!(echo.heard);
        assert!(echo.partial.is_empty());
    }
}
