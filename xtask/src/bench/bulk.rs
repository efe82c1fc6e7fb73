//! Bulk throughput with iperf3 (the server runs in the namespace), and the CPU it costs: the
//! forwarder's and every task's on the machine.
use std::{
    fs,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    contenders::Instance,
    cpu,
    perf::{self, Perf},
    sys,
    topology::{check_stop, die_with_parent, sleep},
};

/// One upload and one download through an instance.
pub struct Bulk {
    pub up_gbps: f64,
    pub down_gbps: f64,
    /// The forwarder's (and its children's) CPU seconds per GB moved, both ways; none for
    /// `direct`.
    pub daemon_cpu_per_gb: Option<f64>,
    /// Every task's CPU seconds (see `cpu`) per GB, over the upload and over the download.
    pub all_cpu_per_gb: [f64; 2],
}

/// `iperf3 -c` through `inst`, `amount` (`-t SECS` or `-n BYTES`) each way. Each direction's
/// window starts right before iperf3 and ends after it and a pause for per-connection processes
/// to be reaped; `perf` profiles each as `TAG-upload` and `TAG-download`.
pub fn measure(
    inst: &mut Instance,
    amount: &[&str],
    dir: &Path,
    tag: &str,
    perf: Option<&Perf>,
) -> Result<Bulk> {
    let pid = inst.pid();
    let daemon0 = pid.map(sys::tree_cpu_seconds);
    let mut gbps = [0.0; 2];
    let mut all_cpu_per_gb = [0.0; 2];
    let mut total_gb = 0.0;
    for (i, (reverse, case)) in [(false, "upload"), (true, "download")]
        .into_iter()
        .enumerate()
    {
        let json = dir.join(format!("{tag}-{case}.json"));
        let (bps, bytes, secs) = perf::during(perf, &format!("{tag}-{case}"), pid, || {
            let all0 = cpu::snapshot();
            let (bps, bytes) = iperf(inst.addr, amount, reverse, &json)?;
            sleep(Duration::from_millis(100))?;
            Ok((bps, bytes, all0.seconds_until(&cpu::snapshot())))
        })?;
        inst.check_alive()?;
        let gb = bytes / 1e9;
        if gb <= 0.0 {
            bail!("iperf3 ({case}) moved no bytes");
        }
        gbps[i] = bps / 1e9;
        all_cpu_per_gb[i] = secs / gb;
        total_gb += gb;
    }
    let daemon1 = pid.map(sys::tree_cpu_seconds);
    Ok(Bulk {
        up_gbps: gbps[0],
        down_gbps: gbps[1],
        daemon_cpu_per_gb: daemon0
            .zip(daemon1)
            .map(|(a, b)| (b - a).max(0.0) / total_gb),
        all_cpu_per_gb,
    })
}

/// One iperf3 client run; returns bits per second and bytes, as received. Retries (bounded)
/// while the server is still busy with the previous test.
fn iperf(addr: SocketAddr, amount: &[&str], reverse: bool, out: &Path) -> Result<(f64, f64)> {
    let host = match addr {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) if a.scope_id() != 0 => format!("{}%{}", a.ip(), a.scope_id()),
        SocketAddr::V6(a) => a.ip().to_string(),
    };
    let mut last_error = String::new();
    for _attempt in 0..5 {
        check_stop()?;
        let mut cmd = Command::new("iperf3");
        cmd.args(["-c", &host, "-p", &addr.port().to_string()])
            .args(amount)
            .args(["-J", "--connect-timeout", "3000"]);
        if reverse {
            cmd.arg("-R");
        }
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(out)?)
            .stderr(Stdio::null());
        let mut child = die_with_parent(&mut cmd)
            .spawn()
            .context("cannot start iperf3")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline || check_stop().is_err() {
                let _ = child.kill();
                let _ = child.wait();
                check_stop()?;
                bail!("iperf3 did not finish within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = fs::read_to_string(out).unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let sum = &json["end"]["sum_received"];
        if let (true, Some(bps), Some(bytes)) = (
            status.success(),
            sum["bits_per_second"].as_f64(),
            sum["bytes"].as_f64(),
        ) {
            return Ok((bps, bytes));
        }
        last_error = json["error"]
            .as_str()
            .map_or_else(|| format!("exit {status}"), str::to_string);
        if !last_error.contains("busy") {
            break;
        }
        sleep(Duration::from_millis(300))?;
    }
    bail!(
        "iperf3 -c {host} -p {}{}: {last_error}",
        addr.port(),
        if reverse { " -R" } else { "" }
    )
}
