//! Lanes: threads of their own, one per core, each with a single-threaded tokio runtime, that
//! carry the bulk transfers `auto` moves to splice.
//!
//! On the daemon's multi-threaded runtime a connection's task runs on whichever worker polled
//! the readiness event that woke it, so a single bulk transfer hops between the workers
//! (measured: both workers busy during a one-stream upload), and every hop meets cold caches
//! and a cross-core wake-up. On a lane it stays on one thread. Measured on 2026-11-29 (2-core
//! VM, the bench's topology, iperf3 uploads of 3 s through daemons side by side, every task's
//! CPU, medians of per-round ratios): a one-worker daemon moved 5 % more per second at 5.5 %
//! less machine CPU per GB than the two-worker one; lanes against no lanes 0.952, 1.02 and
//! 0.964 of the CPU per GB in three runs of 12-16 rounds (docs/profiles.md).
//!
//! A route whose listening sockets form a steered group (`crate::steer`) accepts on the lanes
//! too, each lane on its own socket, and runs those connections start to end on the lane,
//! bulk transfers included.
//!
//! With one lane per core the daemon may run on, each lane is pinned to the core whose SYNs the
//! steering hands it (lane `core % lanes`), so a connection's wake-ups, which land on the core
//! that took its packets, find its lane there instead of wherever the scheduler last put it.
//! Measured side by side (docs/profiles.md, "Pinned lanes"): 2.8 % more short connections per
//! second than the same build unpinned, at the same CPU per connection. While a lane carries a
//! bulk transfer it is unpinned (`pin::Bulk`).
use std::{
    cell::Cell,
    io,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        OnceLock,
    },
};

use tracing::info;

use tokio::{net::TcpStream, runtime};
use tokio_util::sync::CancellationToken;

use super::{pin, userspace, End, Outcome};

/// The lanes, once [`start`] ran.
static LANES: OnceLock<Vec<Lane>> = OnceLock::new();

thread_local! {
    /// The index of the lane whose thread this is (`None` on any other thread).
    static THIS_LANE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Woken when the lanes start.
static STARTED: tokio::sync::Notify = tokio::sync::Notify::const_new();

struct Lane {
    handle: runtime::Handle,
    /// Connections on this lane now.
    busy: AtomicUsize,
}

/// Starts [`planned`] lanes. Called once the daemon runs as its final user: a lane's thread
/// takes the credentials of the thread that starts it (see `privdrop`). Without lanes (never
/// started, or a failed start), bulk transfers run on the caller's runtime.
pub fn start() -> io::Result<()> {
    let count = planned();
    let cores = PIN
        .load(Ordering::Relaxed)
        .then(|| pin::cores(count))
        .flatten();
    let mut lanes = Vec::with_capacity(count);
    for i in 0..count {
        let rt = runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        lanes.push(Lane {
            handle: rt.handle().clone(),
            busy: AtomicUsize::new(0),
        });
        let core = cores.as_ref().map(|c| c[i]);
        std::thread::Builder::new()
            .name(format!("lane-{i}"))
            .spawn(move || {
                THIS_LANE.set(Some(i));
                if let Some(core) = core {
                    pin::hold(core);
                }
                rt.block_on(std::future::pending::<()>());
            })?;
    }
    if let Some(cores) = cores {
        info!("lanes pinned to cores {cores:?} (lane i to the i-th; pin_lanes = false leaves them to the scheduler)");
    }
    // A second call keeps the first lanes (its threads idle).
    let _ = LANES.set(lanes);
    STARTED.notify_waiters();
    Ok(())
}

/// How many lanes [`start`] starts, as [`plan`] set it (`workers`), or one per core.
pub fn planned() -> usize {
    match PLANNED.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Sets how many lanes [`start`] starts, and whether it pins them (`pin_lanes`); before the
/// routes are bound, which make a socket per lane.
pub fn plan(lanes: usize, pin: bool) {
    PLANNED.store(lanes.max(1), Ordering::Relaxed);
    PIN.store(pin, Ordering::Relaxed);
}

/// What [`plan`] set (0: not set).
static PLANNED: AtomicUsize = AtomicUsize::new(0);

/// Whether [`plan`] asked for the lanes to be pinned.
static PIN: AtomicBool = AtomicBool::new(false);

/// The lanes' runtimes, once they run.
pub fn handles() -> Option<Vec<runtime::Handle>> {
    LANES
        .get()
        .map(|lanes| lanes.iter().map(|l| l.handle.clone()).collect())
}

/// The lanes' runtimes, when they start (at once if they run).
pub async fn started() -> Vec<runtime::Handle> {
    loop {
        let notified = STARTED.notified();
        tokio::pin!(notified);
        // Registered before the check, so a start between the two is not missed.
        notified.as_mut().enable();
        if let Some(handles) = handles() {
            return handles;
        }
        notified.await;
    }
}

/// Marks a lane busy while alive.
struct Busy(&'static Lane);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Busy {
    /// Counts one more connection on `lane` until dropped.
    fn mark(lane: &'static Lane) -> Busy {
        lane.busy.fetch_add(1, Ordering::Relaxed);
        Busy(lane)
    }
}

/// The least busy lane, marked busy once more.
fn pick() -> Option<Busy> {
    let lanes = LANES.get()?;
    lanes
        .iter()
        .min_by_key(|l| l.busy.load(Ordering::Relaxed))
        .map(Busy::mark)
}

/// This thread's lane, marked busy once more; `None` off the lanes.
fn this_lane() -> Option<Busy> {
    LANES.get()?.get(THIS_LANE.get()?).map(Busy::mark)
}

/// [`userspace::splice`] on a lane: the sockets leave this runtime and join the lane's. Its
/// task ends with the connection, or when `cancel` fires. A connection a lane accepted (a
/// steered route) stays on it: it runs on one thread already, and that lane counts it for the
/// accept steering, a count a move would leave behind.
pub async fn splice(client: TcpStream, upstream: TcpStream, cancel: &CancellationToken) -> Outcome {
    let here = this_lane();
    let Some(busy) = (if here.is_none() { pick() } else { None }) else {
        // On a lane already (`here` counts it there), or no lanes run: on this thread.
        let _here = here;
        return userspace::splice(client, upstream, cancel).await;
    };
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => return Outcome::ended(End::Ours(e)),
    };
    let cancel = cancel.clone();
    let task = busy.0.handle.spawn(async move {
        let _busy = busy;
        match (TcpStream::from_std(client), TcpStream::from_std(upstream)) {
            (Ok(c), Ok(u)) => userspace::splice(c, u, &cancel).await,
            (Err(e), _) | (_, Err(e)) => Outcome::ended(End::Ours(e)),
        }
    });
    // The lane's task owns the sockets; if this task is dropped, it still runs to its end.
    task.await
        .unwrap_or_else(|e| Outcome::ended(End::Ours(io::Error::other(e))))
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        time::Duration,
    };

    use super::*;
    use crate::forward::userspace::promotion_tests::sockets;

    /// Both directions and both half-closes cross a lane whole, and the lane is free after.
    #[tokio::test]
    async fn a_transfer_on_a_lane_carries_every_byte_and_ends() {
        start().unwrap();
        let (mut a, b, c, mut d) = sockets();
        let cancel = CancellationToken::new();
        let ends = std::thread::spawn(move || {
            let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
            a.write_all(&up).unwrap();
            a.shutdown(std::net::Shutdown::Write).unwrap();
            let mut got = Vec::new();
            d.read_to_end(&mut got).unwrap();
            assert!(got == up, "upload differs");
            d.write_all(b"done").unwrap();
            d.shutdown(std::net::Shutdown::Write).unwrap();
            let mut back = Vec::new();
            a.read_to_end(&mut back).unwrap();
            assert_eq!(back, b"done");
        });
        let outcome = tokio::time::timeout(Duration::from_secs(30), splice(b, c, &cancel))
            .await
            .expect("the lane's transfer did not end");
        ends.join().unwrap();
        assert!(matches!(outcome.end, End::Complete), "{}", outcome.end);
        assert_eq!((outcome.up, outcome.down), (3_000_000, 4));
        let lanes = LANES.get().unwrap();
        assert!(lanes.iter().all(|l| l.busy.load(Ordering::Relaxed) == 0));
    }

    /// A transfer that starts on a lane (a steered route's connection) stays on that lane:
    /// the last lane, where a move would pick the least busy, the first on an idle machine.
    #[tokio::test]
    async fn a_transfer_already_on_a_lane_stays_there() {
        start().unwrap();
        let lanes = LANES.get().unwrap();
        let last = lanes.len() - 1;
        let (mut a, b, c, mut d) = sockets();
        // Registered with the lane's reactor, as an accepted connection's sockets are.
        let (b, c) = (b.into_std().unwrap(), c.into_std().unwrap());
        let cancel = CancellationToken::new();
        let task = lanes[last].handle.spawn(async move {
            let (b, c) = (
                TcpStream::from_std(b).unwrap(),
                TcpStream::from_std(c).unwrap(),
            );
            splice(b, c, &cancel).await
        });
        a.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        // The transfer runs now, and its lane counts it.
        assert!(lanes[last].busy.load(Ordering::Relaxed) >= 1);
        a.shutdown(std::net::Shutdown::Write).unwrap();
        d.shutdown(std::net::Shutdown::Write).unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the transfer did not end")
            .unwrap();
        assert_eq!((outcome.up, outcome.down), (4, 0));
    }
}
