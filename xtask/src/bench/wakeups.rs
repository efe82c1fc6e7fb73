//! Cross-core wake-ups: what a round trip costs on a machine whose idle cores sleep. A task woken
//! on another core is sent an inter-processor interrupt (the rescheduling or function-call IPI,
//! `/proc/interrupts`); in a virtual machine that interrupt goes through the hypervisor, and a
//! sleeping virtual core must first be run again. [`count`] reads the machine's IPIs, so the
//! round-trip case can say how many each contender's round trip cost; [`cost_note`] measures
//! what one costs here, against a wake-up within one core.
use std::{
    fs,
    io::{Read, Write},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// The `/proc/interrupts` lines of the IPIs that wake a task on another core, by their
/// description: x86's RES and CAL, arm64's IPI0 and IPI1 (and its single-call line).
const WAKE_IPIS: [&str; 3] = [
    "Rescheduling interrupts",
    "Function call interrupts",
    "Single function call interrupts",
];

/// The IPIs of [`WAKE_IPIS`] every core has taken since boot; `None` where `/proc/interrupts`
/// shows none of them.
pub fn count() -> Option<u64> {
    let text = fs::read_to_string("/proc/interrupts").ok()?;
    parse(&text)
}

fn parse(text: &str) -> Option<u64> {
    let cores = text.lines().next()?.split_whitespace().count();
    let mut found = None;
    for line in text.lines().skip(1) {
        let Some((_, rest)) = line.split_once(':') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let counts: Vec<u64> = fields
            .by_ref()
            .take(cores)
            .map_while(|f| f.parse().ok())
            .collect();
        let description = fields.collect::<Vec<_>>().join(" ");
        if counts.len() == cores && WAKE_IPIS.contains(&description.as_str()) {
            *found.get_or_insert(0) += counts.iter().sum::<u64>();
        }
    }
    found
}

/// Round trips of one byte between two threads for [`cost`].
const PINGS: u32 = 2_000;

/// The time one wake-up takes, half of a round trip of one byte between two threads over a
/// socket pair, with the threads pinned to `cores`; `None` if they cannot be pinned there.
fn cost(cores: [usize; 2]) -> Option<Duration> {
    let original = sched_getaffinity(None).ok()?;
    let (mut a, mut b) = UnixStream::pair().ok()?;
    let echo = std::thread::spawn(move || -> Option<()> {
        pin(cores[1])?;
        let mut byte = [0u8];
        for _ in 0..PINGS {
            b.read_exact(&mut byte).ok()?;
            b.write_all(&byte).ok()?;
        }
        Some(())
    });
    let timed = (|| {
        pin(cores[0])?;
        let mut byte = [0u8];
        let t0 = Instant::now();
        for _ in 0..PINGS {
            a.write_all(&byte).ok()?;
            a.read_exact(&mut byte).ok()?;
        }
        Some(t0.elapsed() / (2 * PINGS))
    })();
    // A failed side drops its end, which ends the other's read.
    drop(a);
    let echoed = echo.join().ok().flatten();
    let _ = sched_setaffinity(None, &original);
    timed.filter(|_| echoed.is_some())
}

fn pin(core: usize) -> Option<()> {
    let mut set = CpuSet::new();
    set.set(core);
    sched_setaffinity(None, &set).ok()
}

/// The report's line on what a wake-up costs here, across cores and within one; `None` with
/// fewer than two cores, or where the threads cannot be pinned.
pub fn cost_note() -> Option<String> {
    let allowed = sched_getaffinity(None).ok()?;
    let cores: Vec<usize> = (0..CpuSet::MAX_CPU)
        .filter(|&c| allowed.is_set(c))
        .take(2)
        .collect();
    let [first, second] = cores[..] else {
        return None;
    };
    let within = cost([first, first])?;
    let across = cost([first, second])?;
    Some(format!(
        "A wake-up takes {:.1} µs across cores and {:.1} µs within one on this machine (two \
         threads passing a byte back and forth {PINGS} times over a socket pair, on cores {first} \
         and {second}, then both on core {first}; half a round trip). A forwarded round \
         trip crosses cores where its client, forwarder and upstream run apart, and each crossing \
         costs the difference: see the cross-core wake-ups per round trip below.",
        across.as_secs_f64() * 1e6,
        within.as_secs_f64() * 1e6,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_wake_up_ipis_of_every_core() {
        let x86 = "           CPU0       CPU1       \n\
                   0:         44          0   IO-APIC   2-edge      timer\n\
                 NMI:          0          0   Non-maskable interrupts\n\
                 RES:      10502      10488   Rescheduling interrupts\n\
                 CAL:        387        378   Function call interrupts\n\
                 TLB:         31         32   TLB shootdowns\n\
                 ERR:          0\n";
        assert_eq!(parse(x86), Some(10502 + 10488 + 387 + 378));
        let arm = "           CPU0       CPU1       \n\
                   IPI0:        10         20       Rescheduling interrupts\n\
                   IPI1:         1          2       Function call interrupts\n\
                   IPI2:         5          5       CPU stop interrupts\n";
        assert_eq!(parse(arm), Some(33));
        assert_eq!(parse("CPU0\n 0: 4 timer\n"), None);
    }

    #[test]
    fn reads_this_machines_ipis_and_times_a_wake_up() {
        assert!(count().is_some(), "/proc/interrupts lists no wake-up IPIs");
        let allowed = sched_getaffinity(None).unwrap();
        let core = (0..CpuSet::MAX_CPU).find(|&c| allowed.is_set(c)).unwrap();
        let within = cost([core, core]).expect("a thread can be pinned to a core it may use");
        assert!(within > Duration::ZERO && within < Duration::from_millis(100));
    }
}
