//! "All tasks CPU": the CPU time charged to every task on the machine, kernel threads included
//! (kworkers, ksoftirqd, the sockmap psock backlog workers), over a measured window. The busy
//! time of `/proc/stat` is not used: on these virtual machines it is unreliable.
//!
//! Each process's `/proc/PID/stat` gives utime+stime of all its threads, live and exited, and
//! cutime+cstime, what the children it has reaped used. The window's CPU is the sum of each
//! process's growth (both parts) from a snapshot before to one after; a process born in the
//! window counts whole; one that exited in it counts through its parent's cutime+cstime, which
//! holds the child's whole life, less what the child had at the first snapshot. Lost: the
//! in-window CPU of kernel threads that exit in the window (a retiring kworker; nobody reaps
//! them with accounting), of processes whose parent does not wait for them, and softirq work
//! done on an idle CPU (charged to the idle task, pid 0, which /proc does not list). Where the
//! kernel has `CONFIG_IRQ_TIME_ACCOUNTING`, irq and softirq time is in no task's time at all
//! ([`irq_time_note`] says so in the report).
use std::collections::HashMap;

use super::sys::{clk_tck, pids, stat_fields};

/// `PF_KTHREAD` in the flags field of `/proc/PID/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

/// One process at one moment.
#[derive(Clone, Copy)]
struct Times {
    /// utime+stime of the process (its threads, live and exited), in clock ticks.
    own: u64,
    /// cutime+cstime: its reaped children's, in clock ticks.
    reaped: u64,
    kthread: bool,
}

/// Every process on the machine, by (pid, start time): a reused pid is another process.
pub struct Snapshot(HashMap<(u32, u64), Times>);

/// Reads every `/proc/PID/stat` (about a millisecond per hundred processes).
pub fn snapshot() -> Snapshot {
    Snapshot(
        pids()
            .filter_map(|pid| read(pid).map(|(start, t)| ((pid, start), t)))
            .collect(),
    )
}

/// (start time, times) of one process, from the fields after the command name.
fn read(pid: u32) -> Option<(u64, Times)> {
    // Field 3 (state) is index 0 here: flags is field 9, utime..cstime 14..17, starttime 22.
    let f = stat_fields(pid)?;
    if f.len() <= 19 {
        return None;
    }
    Some((
        f[19],
        Times {
            own: f[11] + f[12],
            reaped: f[13] + f[14],
            kthread: f[6] & PF_KTHREAD != 0,
        },
    ))
}

impl Snapshot {
    /// CPU seconds every task used from `self` to `later` (see the module's comment).
    pub fn seconds_until(&self, later: &Snapshot) -> f64 {
        let mut ticks: i64 = 0;
        for (key, after) in &later.0 {
            let before = self.0.get(key).map_or(0, |b| b.own + b.reaped);
            ticks += (after.own + after.reaped) as i64 - before as i64;
        }
        for (key, before) in &self.0 {
            // Exited: a user process is in its parent's cutime whole, so its share from before
            // the window comes off; a kernel thread is in nobody's (its growth is lost).
            if !later.0.contains_key(key) && !before.kthread {
                ticks -= (before.own + before.reaped) as i64;
            }
        }
        ticks.max(0) as f64 / clk_tck()
    }
}

/// A remark for the report when this kernel keeps irq and softirq time out of the tasks' times
/// (`CONFIG_IRQ_TIME_ACCOUNTING=y` in `/proc/config.gz`); `None` when it does not or is unknown.
pub fn irq_time_note() -> Option<String> {
    let out = std::process::Command::new("zcat")
        .arg("/proc/config.gz")
        .output()
        .ok()?;
    let config = String::from_utf8_lossy(&out.stdout);
    config
        .lines()
        .any(|l| l == "CONFIG_IRQ_TIME_ACCOUNTING=y")
        .then(|| {
            "This kernel has CONFIG_IRQ_TIME_ACCOUNTING=y: time in hard and soft interrupts \
             (much of TCP, veth and the sockmap verdict) is charged to no task, so the all \
             tasks CPU figures leave it out; ksoftirqd's share is still in."
                .to_string()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_kernel_threads_and_counts_a_busy_child() {
        let before = snapshot();
        assert!(
            before.0.values().any(|t| t.kthread),
            "no kernel thread seen"
        );
        assert!(before.0.keys().any(|&(pid, _)| pid == std::process::id()));
        // A child that burns about 0.1 s (more on a loaded machine), reaped in the window.
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap();
        assert!(status.success());
        let after = snapshot();
        let s = before.seconds_until(&after);
        assert!(s >= 0.05, "the window's CPU {s} s misses the reaped child");
        assert_eq!(before.seconds_until(&before), 0.0);
    }
}
