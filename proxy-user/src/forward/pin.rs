//! Pinning the lanes (`forward/lanes.rs`) to cores: lane `core % lanes`, the lane the steering
//! program hands that core's SYNs (`crate::steer`), runs on `core`, so a connection's wake-ups,
//! which land on the core that took its packets, find its lane there. Measured side by side
//! (docs/profiles.md, "Pinned lanes"): 2.8 % more short connections per second than unpinned,
//! at the same CPU per connection.
//!
//! A thread carrying a bulk transfer ([`Bulk`], taken by a direction of the splice and copy
//! loops once it has carried 256 KiB) is unpinned while it does: pinned, a lane carrying an
//! upload shared its core with the sender and moved 0.78x the bytes per second at 1.17x the CPU
//! per GB.
use std::{cell::Cell, sync::OnceLock};

use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};
use tracing::{info, warn};

thread_local! {
    /// The core this thread is pinned to when it carries no bulk transfer (`None`: not pinned,
    /// as every thread but a pinned lane's).
    static CORE: Cell<Option<usize>> = const { Cell::new(None) };
    /// The bulk transfers this thread carries now.
    static BULK: Cell<usize> = const { Cell::new(0) };
}

/// The daemon's allowed cores, where a pinned lane may go while it carries a bulk transfer.
static ALLOWED: OnceLock<CpuSet> = OnceLock::new();

/// The core for each of `count` lanes, when the daemon may run on exactly `count` cores and
/// they fall one to each lane; `None` otherwise (the scheduler places the lanes).
pub fn cores(count: usize) -> Option<Vec<usize>> {
    let allowed = sched_getaffinity(None)
        .inspect_err(|e| warn!("lanes not pinned: cannot read the daemon's cores ({e})"))
        .ok()?;
    let cores: Vec<usize> = (0..CpuSet::MAX_CPU)
        .filter(|&c| allowed.is_set(c))
        .collect();
    let by_lane = lane_cores(&cores, count);
    let _ = ALLOWED.set(allowed);
    if by_lane.is_none() && cores.len() == count {
        info!("lanes not pinned: cores {cores:?} do not fall one to each of {count} lanes");
    }
    by_lane
}

/// Lane `core % count` for each of `cores`, as the steering program picks, if that gives each
/// lane exactly one core: `result[lane]` is its core.
fn lane_cores(cores: &[usize], count: usize) -> Option<Vec<usize>> {
    if count < 2 || cores.len() != count {
        return None;
    }
    let mut by_lane = vec![None; count];
    for &core in cores {
        let slot = &mut by_lane[core % count];
        if slot.replace(core).is_some() {
            return None;
        }
    }
    by_lane.into_iter().collect()
}

/// Pins this thread (a lane's) to `core`, and keeps it there between bulk transfers.
pub fn hold(core: usize) {
    CORE.set(Some(core));
    pin(core);
}

/// Pins this thread to `core`. On failure (the core left the daemon's cpuset while it ran, and
/// the kernel widened the thread's affinity) the thread stays where the scheduler puts it and is
/// not pinned again, so the warning comes once per lane, not once per bulk transfer.
fn pin(core: usize) {
    let mut set = CpuSet::new();
    set.set(core);
    if let Err(e) = sched_setaffinity(None, &set) {
        CORE.set(None);
        warn!(
            "a lane not pinned to core {core} ({e}); it is left to the scheduler from now on \
             (a core taken from the daemon's cpuset? restart spliced to pin its lanes again)"
        );
    }
}

/// A bulk transfer on this thread, while alive: the first unpins a pinned lane (its splice or
/// copy loop needs a core of its own beside the sender's and the receiver's; the scheduler finds
/// one), the last pins it again. A lane's tasks stay on its thread, so each is created and
/// dropped there; on any other thread it changes nothing (no core is kept there).
pub struct Bulk;

impl Bulk {
    /// Counts one more bulk transfer on this thread (see [`Bulk`]).
    pub fn start() -> Bulk {
        if BULK.get() == 0 {
            if let (Some(core), Some(all)) = (CORE.get(), ALLOWED.get()) {
                if let Err(e) = sched_setaffinity(None, all) {
                    warn!("a lane on core {core} not unpinned for a bulk transfer: {e}");
                }
            }
        }
        BULK.set(BULK.get() + 1);
        Bulk
    }
}

impl Drop for Bulk {
    fn drop(&mut self) {
        BULK.set(BULK.get().saturating_sub(1));
        if let (0, Some(core)) = (BULK.get(), CORE.get()) {
            pin(core);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lane `core % count` gets `core`, one core each, or nothing is pinned.
    #[test]
    fn lanes_get_the_cores_the_steering_gives_them() {
        assert_eq!(lane_cores(&[0, 1], 2), Some(vec![0, 1]));
        assert_eq!(lane_cores(&[2, 3], 2), Some(vec![2, 3]));
        assert_eq!(lane_cores(&[1, 2], 2), Some(vec![2, 1]));
        assert_eq!(lane_cores(&[4, 5, 6, 7], 4), Some(vec![4, 5, 6, 7]));
        // Two cores for one lane (0 % 2 == 2 % 2), a core short, one lane: no pinning.
        assert_eq!(lane_cores(&[0, 2], 2), None);
        assert_eq!(lane_cores(&[0, 1, 2], 2), None);
        assert_eq!(lane_cores(&[0], 1), None);
    }

    /// A core the thread may not run on: the thread keeps its cores, and a lane that cannot go
    /// back to its core after a bulk transfer is not tried again.
    #[test]
    fn a_core_the_lane_cannot_have_is_given_up_once() {
        std::thread::spawn(|| {
            let before = sched_getaffinity(None).unwrap();
            let absent = CpuSet::MAX_CPU - 1;
            assert!(
                !before.is_set(absent),
                "test needs a core this thread may not use"
            );
            hold(absent);
            assert_eq!(CORE.get(), None, "a core that cannot be had is not kept");
            assert_eq!(sched_getaffinity(None).unwrap(), before);
            // A lane pinned at start whose core went away during a transfer.
            CORE.set(Some(absent));
            drop(Bulk::start());
            assert_eq!(CORE.get(), None, "given up after the first failed re-pin");
            assert_eq!(BULK.get(), 0);
            drop(Bulk::start());
            assert_eq!(sched_getaffinity(None).unwrap(), before);
        })
        .join()
        .unwrap();
    }
}
