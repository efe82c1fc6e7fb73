//! Bulk throughput with iperf3 (the server runs in the namespace), and the CPU it costs.
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
    sys,
    topology::{check_stop, die_with_parent, sleep},
};

/// One upload and one download through an instance.
pub struct Bulk {
    pub up_gbps: f64,
    pub down_gbps: f64,
    /// The forwarder's (and its children's) CPU seconds per GB moved; none for `direct`.
    pub daemon_cpu_per_gb: Option<f64>,
    /// The whole machine's busy CPU seconds (softirq included) per GB moved.
    pub system_cpu_per_gb: f64,
}

/// `iperf3 -c` through `inst`, `amount` (`-t SECS` or `-n BYTES`) each way. The CPU counters are read right
/// before the upload and right after the download (and a pause for per-connection processes to
/// be reaped).
pub fn measure(inst: &mut Instance, amount: &[&str], dir: &Path, tag: &str) -> Result<Bulk> {
    let pid = inst.pid();
    let daemon0 = pid.map(sys::tree_cpu_seconds);
    let system0 = sys::system_busy_seconds()?;
    let (up_bps, up_bytes) = iperf(
        inst.addr,
        amount,
        false,
        &dir.join(format!("{tag}-up.json")),
    )?;
    inst.check_alive()?;
    let (down_bps, down_bytes) = iperf(
        inst.addr,
        amount,
        true,
        &dir.join(format!("{tag}-down.json")),
    )?;
    inst.check_alive()?;
    sleep(Duration::from_millis(200))?;
    let system1 = sys::system_busy_seconds()?;
    let daemon1 = pid.map(sys::tree_cpu_seconds);
    let gb = (up_bytes + down_bytes) / 1e9;
    if gb <= 0.0 {
        bail!("iperf3 moved no bytes");
    }
    Ok(Bulk {
        up_gbps: up_bps / 1e9,
        down_gbps: down_bps / 1e9,
        daemon_cpu_per_gb: daemon0.zip(daemon1).map(|(a, b)| (b - a).max(0.0) / gb),
        system_cpu_per_gb: (system1 - system0).max(0.0) / gb,
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
