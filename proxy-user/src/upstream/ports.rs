//! Local ports running out: when clients close first, spliced's side of each upstream
//! connection ends in TIME_WAIT (60 s on Linux). Every connect() must find a local port whose
//! 4-tuple to that upstream is free, so past `ports / 60 s` connections per second to one
//! upstream address (470/s with the default `ip_local_port_range` of 28,232 ports) the port
//! range is spent, and each connect() walks the whole range inside the system call (measured:
//! 4 ms median, 11,000 → 900 connections/s) or fails with `EADDRNOTAVAIL`.
//!
//! The kernel's answer is `net.ipv4.tcp_tw_reuse=1` (it covers IPv6 too: both families go
//! through `tcp_twsk_unique()` in net/ipv4/tcp_ipv4.c, which reads the IPv4 sysctl). It lets
//! connect() take a TIME_WAIT port once `tcp_tw_reuse_delay` (1 s) has passed, when the old
//! connection carried TCP timestamps (PAWS then tells old segments from new). The default, 2,
//! reuses only where an address is loopback (127/8, ::1, v4-mapped loopback) or the socket is
//! bound to `lo`: a container at `fe80::…%lxdbr0` or on a bridge gets nothing from it.
//! spliced cannot close its side without TIME_WAIT and without risking bytes: its FIN must
//! carry the client's half-close, and by the time the upstream's FIN arrives the kernel has
//! already turned the socket into a TIME_WAIT entry (`tcp_fin()` → `tcp_time_wait()`), even
//! while spliced still holds the descriptor. So spliced finds the condition, counts it and says
//! once per server what to change. A connect() slow on the wall clock may only have waited for
//! a CPU (a busy machine), so a dial counts only when its time was spent on the CPU too, or
//! when it found no port at all.
use std::{
    fs,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

/// A connect() system call that took longer than this on the wall clock is looked into (a
/// plain one takes tens of microseconds, the handshake over veth or loopback included, which
/// the kernel runs inline; a search of the default 28,232 ports took 0.8-1 ms here).
pub const SLOW_CONNECT: Duration = Duration::from_micros(500);
/// A connect() that spent this much of this thread's CPU time was the kernel's port search.
pub const SEARCH_CPU: Duration = Duration::from_micros(250);

/// Dials still to be timed on the thread's CPU clock too. Zero (no suspicion) costs two
/// vDSO clock reads per dial; a suspicion adds two `clock_gettime(CLOCK_THREAD_CPUTIME_ID)`
/// system calls to each of the next [`SUSPICION`] dials.
static CPU_TIMED: AtomicU32 = AtomicU32::new(0);
/// Until when (seconds on [`clock`]) no new suspicion starts, after one that found no search:
/// the TIME_WAIT count also holds entries that take no local port (a listener's side, where
/// spliced's clients close last), so on a busy machine suspicions could otherwise run all the
/// time. A time, not a number of dials: a range that fills up slowly is looked at again soon.
static QUIET_UNTIL: AtomicU64 = AtomicU64::new(0);
/// How many dials one suspicion times on the CPU clock (a real port search makes most dials
/// slow, so a few suffice).
const SUSPICION: u32 = 1_000;
/// How long a suspicion that found nothing keeps the next one off. `EADDRNOTAVAIL` is counted
/// whatever this says.
const QUIET_SECS: u64 = 10;

/// Whole seconds since the first call, plus one (so 0 means "never").
fn clock() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_secs() + 1
}

fn quiet(now: u64) -> bool {
    now < QUIET_UNTIL.load(Ordering::Relaxed)
}

/// Whether a wall-slow dial should look at the port range now: not while a suspicion runs or
/// keeps quiet, and at most once a second (on a busy machine many dials wait for a CPU; each
/// look is three /proc files).
pub fn may_suspect() -> bool {
    static LAST_LOOK: AtomicU64 = AtomicU64::new(0);
    let now = clock();
    if CPU_TIMED.load(Ordering::Relaxed) > 0 || quiet(now) {
        return false;
    }
    let last = LAST_LOOK.load(Ordering::Relaxed);
    last != now
        && LAST_LOOK
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// A slow connect() while TIME_WAIT fills the port range: time the next dials on the CPU
/// (unless a recent suspicion found nothing).
pub fn suspect() {
    if !quiet(clock()) {
        CPU_TIMED.store(SUSPICION, Ordering::Relaxed);
    }
}

/// A dial searched on the CPU: keep timing.
pub fn confirmed() {
    CPU_TIMED.store(SUSPICION, Ordering::Relaxed);
}

/// Counts one dial against [`CPU_TIMED`]; whether to time it on the CPU clock.
fn cpu_timed() -> bool {
    if CPU_TIMED.load(Ordering::Relaxed) == 0 {
        return false;
    }
    match CPU_TIMED.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)) {
        // The suspicion's last dial, and no search confirmed it on the way.
        Ok(1) => {
            QUIET_UNTIL.store(clock() + QUIET_SECS, Ordering::Relaxed);
            true
        }
        Ok(_) => true,
        Err(_) => false,
    }
}

/// This thread's CPU time (user and system), from `CLOCK_THREAD_CPUTIME_ID`.
fn thread_cpu() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (ret == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// How long one system call took: on the wall clock, and on the thread's CPU clock when a
/// port search is suspected (see [`suspect`]).
#[derive(Clone, Copy, Debug)]
pub struct Timed {
    pub wall: Duration,
    /// The CPU time spent in the call: a thread that waited for a CPU (a busy machine) has a
    /// long wall time and a short CPU time; the kernel's port search is all CPU.
    pub cpu: Option<Duration>,
}

/// Times one system call; see [`Timed`].
pub struct Timer {
    wall: Instant,
    cpu: Option<Duration>,
}

impl Timer {
    pub fn start() -> Timer {
        Timer {
            cpu: if cpu_timed() { thread_cpu() } else { None },
            wall: Instant::now(),
        }
    }

    pub fn stop(self) -> Timed {
        let wall = self.wall.elapsed();
        let cpu = self
            .cpu
            .and_then(|before| Some(thread_cpu()?.saturating_sub(before)));
        Timed { wall, cpu }
    }
}

/// What the kernel says of the local ports of this network namespace when a dial was slow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortPressure {
    /// Sockets in TIME_WAIT (both families), from `/proc/net/sockstat`.
    pub time_wait: u64,
    /// `net.ipv4.ip_local_port_range`, both ends included.
    pub range: (u32, u32),
    /// `net.ipv4.tcp_tw_reuse`.
    pub tw_reuse: Option<u8>,
}

impl PortPressure {
    /// Reads the namespace's figures; `None` when /proc does not have them.
    pub fn read() -> Option<PortPressure> {
        let sockstat = fs::read_to_string("/proc/net/sockstat").ok()?;
        let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        let reuse = fs::read_to_string("/proc/sys/net/ipv4/tcp_tw_reuse").ok();
        Some(PortPressure {
            time_wait: time_wait(&sockstat)?,
            range: port_range(&range)?,
            tw_reuse: reuse.and_then(|r| r.trim().parse().ok()),
        })
    }

    /// Local ports connect() chooses from.
    pub fn ports(&self) -> u64 {
        u64::from(self.range.1.saturating_sub(self.range.0)) + 1
    }

    /// Whether TIME_WAIT sockets can explain a slow or failed connect(): they fill at least
    /// three quarters of the port range (a slow connect with fewer is the machine being busy;
    /// with half the ports taken a search still finds one within a few).
    pub fn explains_slow_dials(&self) -> bool {
        self.time_wait * 4 >= self.ports() * 3
    }

    /// The warning's text: what was seen, why, and the fix.
    pub fn advice(&self, seen: &str) -> String {
        let ports = self.ports();
        let fix = match self.tw_reuse {
            Some(1) => "net.ipv4.tcp_tw_reuse is 1 already, so either the upstream does not \
                        send TCP timestamps (reuse needs them) or more than ports / \
                        tcp_tw_reuse_delay connections a second reach it: widen \
                        net.ipv4.ip_local_port_range (e.g. `1024 65535`) or spread the \
                        upstream over more addresses"
                .to_owned(),
            now => format!(
                "fix: `sysctl -w net.ipv4.tcp_tw_reuse=1` and the same line in \
                 /etc/sysctl.d/ (now {}: {}; 1 lets connect() reuse a TIME_WAIT port after \
                 1 s when the upstream uses TCP timestamps, IPv6 included); widening \
                 net.ipv4.ip_local_port_range (e.g. `1024 65535`) adds ports too",
                now.map_or("unknown".to_owned(), |n| n.to_string()),
                if now == Some(2) {
                    "loopback addresses only"
                } else {
                    "never"
                }
            ),
        };
        format!(
            "dials are slow finding a free local port: {seen}, with {} sockets in TIME_WAIT \
             and {ports} local ports (net.ipv4.ip_local_port_range {} {}). Where clients \
             close first, spliced's side to the upstream stays in TIME_WAIT for 60 s, so more \
             than {} to one upstream address spend the range; {fix}. Counted in \
             spliced_upstream_port_search_dials_total; said once per server",
            self.time_wait,
            self.range.0,
            self.range.1,
            spending_rate(ports),
        )
    }
}

/// The connection rate that spends `ports` local ports when each stays in TIME_WAIT for 60 s:
/// `470 connections/s`; below 10 a second, exactly, as so many a minute (a range of 10 ports
/// is spent by more than 10 connections a minute, not "more than 0 connections/s").
fn spending_rate(ports: u64) -> String {
    match ports {
        1 => "1 connection a minute".to_owned(),
        0..600 => format!("{ports} connections a minute"),
        _ => format!("{} connections/s", ports / 60),
    }
}

/// The `tw` field of the `TCP:` line of `/proc/net/sockstat`.
fn time_wait(sockstat: &str) -> Option<u64> {
    let line = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "tw")?;
    words.next()?.parse().ok()
}

/// `ip_local_port_range`: two numbers.
fn port_range(text: &str) -> Option<(u32, u32)> {
    let mut n = text.split_whitespace().map(str::parse::<u32>);
    Some((n.next()?.ok()?, n.next()?.ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sockstat_and_range() {
        let s =
            "sockets: used 120\nTCP: inuse 5 orphan 0 tw 28100 alloc 9 mem 2\nUDP: inuse 1 mem 0\n";
        assert_eq!(time_wait(s), Some(28100));
        assert_eq!(time_wait("TCP: inuse 5\n"), None);
        assert_eq!(port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(port_range("1024"), None);
    }

    #[test]
    fn pressure_needs_three_quarters_of_the_range_in_time_wait() {
        let mut p = PortPressure {
            time_wait: 21_173,
            range: (32768, 60999),
            tw_reuse: Some(2),
        };
        assert_eq!(p.ports(), 28_232);
        assert!(!p.explains_slow_dials());
        p.time_wait = 21_174;
        assert!(p.explains_slow_dials());
        let text = p.advice("connect() took 4.1 ms");
        assert!(text.contains("sysctl -w net.ipv4.tcp_tw_reuse=1"), "{text}");
        assert!(text.contains("now 2: loopback addresses only"), "{text}");
        assert!(text.contains("more than 470 connections/s"), "{text}");
        p.tw_reuse = Some(1);
        let text = p.advice("no local port was free");
        assert!(text.contains("is 1 already"), "{text}");
        assert!(text.contains("ip_local_port_range"), "{text}");
    }

    #[test]
    fn a_small_range_is_spent_at_so_many_connections_a_minute() {
        let p = PortPressure {
            time_wait: 10,
            range: (40000, 40009),
            tw_reuse: Some(2),
        };
        let text = p.advice("no local port was free");
        assert!(
            text.contains("more than 10 connections a minute to one"),
            "{text}"
        );
        assert!(!text.contains("connections/s"), "{text}");
        assert_eq!(spending_rate(1), "1 connection a minute");
        assert_eq!(spending_rate(599), "599 connections a minute");
        assert_eq!(spending_rate(600), "10 connections/s");
        assert_eq!(spending_rate(28_232), "470 connections/s");
    }

    #[test]
    fn a_suspicion_times_dials_on_the_cpu_clock_then_keeps_quiet() {
        let plain = Timer::start().stop();
        assert!(plain.cpu.is_none());
        suspect();
        let t = Timer::start();
        // Spins for 3 ms of this thread's CPU time (a busy machine may stretch the wall time).
        let spin = thread_cpu().unwrap();
        while thread_cpu().unwrap() - spin < Duration::from_millis(3) {}
        let timed = t.stop();
        let cpu = timed.cpu.expect("timed on the CPU clock");
        assert!(cpu >= Duration::from_millis(3), "{timed:?}");
        // The CPU clock's reads enclose the wall clock's.
        assert!(cpu <= timed.wall + Duration::from_millis(1), "{timed:?}");
        let t = Timer::start();
        std::thread::sleep(Duration::from_millis(3));
        let slept = t.stop();
        assert!(
            slept.cpu.expect("still suspected") < Duration::from_millis(1),
            "{slept:?}"
        );
        // The rest of the suspicion finds nothing: then no new one starts for a while. (Other
        // tests' dials, in parallel, count against the same suspicion.)
        let timed = (0..SUSPICION)
            .filter(|_| Timer::start().stop().cpu.is_some())
            .count() as u32;
        assert!(
            (SUSPICION - 200..=SUSPICION - 2).contains(&timed),
            "{timed}"
        );
        suspect();
        assert!(
            Timer::start().stop().cpu.is_none(),
            "a suspicion started while quiet"
        );
        assert!(quiet(clock()) && !may_suspect());
        assert!(QUIET_UNTIL.load(Ordering::Relaxed) <= clock() + QUIET_SECS);
    }

    #[test]
    fn this_namespace_has_the_figures() {
        let p = PortPressure::read().expect("/proc/net/sockstat and the port range");
        assert!(p.ports() > 1, "{p:?}");
    }
}
