//! The rules at accept: connections that did not pass through the XDP front (loopback, an
//! interface not in `xdp`, or `xdp` unset) are checked here and closed at once, so a rule never
//! depends on the path a packet took. Connections that did pass it are checked again, which
//! changes nothing for the ACL; the accept-time SYN bucket sees only completed handshakes, each
//! after its SYN took a token in XDP, so it never refuses what XDP let through at the same rate.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use proxy_common::{syn_bucket_new, syn_bucket_take, XdpSynBucket, XDP_SYN_SOURCES};

use super::rules::{Reason, SourceRules};

/// One route's accept-time check and its refusal counters.
#[derive(Debug)]
pub struct AcceptGuard {
    rules: SourceRules,
    epoch: Instant,
    /// Source (IPv4, or IPv6 /64) -> bucket; bounded by [`XDP_SYN_SOURCES`].
    buckets: Mutex<HashMap<IpAddr, XdpSynBucket>>,
    refused: [AtomicU64; 2],
}

impl AcceptGuard {
    /// A guard enforcing `rules`.
    pub fn new(rules: SourceRules) -> AcceptGuard {
        AcceptGuard {
            rules,
            epoch: Instant::now(),
            buckets: Mutex::new(HashMap::new()),
            refused: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// The rules this guard enforces.
    pub fn rules(&self) -> &SourceRules {
        &self.rules
    }

    /// Whether a connection from `peer` may stay; a refusal is counted.
    pub fn check(&self, peer: IpAddr) -> Result<(), Reason> {
        self.check_at(peer, self.epoch.elapsed())
    }

    /// [`Self::check`] at `now` since the guard's creation (tests drive the clock).
    pub fn check_at(&self, peer: IpAddr, now: Duration) -> Result<(), Reason> {
        let peer = peer.to_canonical();
        let verdict = self.rules.admits(peer).and_then(|()| self.take(peer, now));
        if let Err(reason) = verdict {
            self.refused[reason.index() as usize].fetch_add(1, Ordering::Relaxed);
        }
        verdict
    }

    /// Connections refused at accept for `reason` since the guard was made.
    pub fn refused(&self, reason: Reason) -> u64 {
        self.refused[reason.index() as usize].load(Ordering::Relaxed)
    }

    fn take(&self, peer: IpAddr, now: Duration) -> Result<(), Reason> {
        let Some(rate) = self.rules.syn_rate else {
            return Ok(());
        };
        let now = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let key = match peer {
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & !u128::from(u64::MAX)).into()),
            v4 => v4,
        };
        // A poisoned lock only means another accept panicked mid-update: the map is still valid.
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bucket) = buckets.get_mut(&key) {
            return syn_bucket_take(bucket, rate, now)
                .then_some(())
                .ok_or(Reason::SynRate);
        }
        if buckets.len() >= XDP_SYN_SOURCES as usize {
            // Forget the sources whose buckets have refilled: they would start full anyway.
            buckets.retain(|_, b| now.saturating_sub(b.last_ns) < 2_000_000_000);
            if buckets.len() >= XDP_SYN_SOURCES as usize {
                buckets.clear();
            }
        }
        buckets.insert(key, syn_bucket_new(rate, now));
        Ok(())
    }
}

/// Counts events and says, at most once per `interval`, how many there were since it last
/// said: one log line per route and interval, never one per packet.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimiter {
    /// A limiter that speaks at most once per `interval`.
    pub fn new(interval: Duration) -> LogLimiter {
        LogLimiter {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// Adds `n` events at `now`; returns the count to log when the interval has passed since
    /// the last line (or there was none), else `None`.
    pub fn add(&self, n: u64, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 += n;
        let due = state
            .0
            .is_none_or(|last| now.duration_since(last) >= self.interval);
        if due && state.1 > 0 {
            state.0 = Some(now);
            return Some(std::mem::take(&mut state.1));
        }
        None
    }
}
