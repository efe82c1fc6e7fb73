//! The global bound on bytes waiting in psock backlogs (`max_buffered_total`, trap 8).
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

/// The smallest per-direction allowance, granted even when the global pool is exhausted, so a
/// connection always makes progress.
const MIN_GRANT: u64 = 256 * 1024;

/// The global bound on bytes held in psock backlogs across all connections (trap 8). Each
/// direction of each sockmap connection reserves its allowance here for its lifetime.
#[derive(Debug)]
pub struct Pool {
    max: u64,
    reserved: AtomicU64,
}

impl Pool {
    /// A pool of `max` bytes.
    pub fn new(max: u64) -> Self {
        Pool {
            max,
            reserved: AtomicU64::new(0),
        }
    }

    /// Reserves up to `want` bytes: what is left, but at least [`MIN_GRANT`].
    pub(super) fn reserve(&self, want: u64) -> u64 {
        let mut grant = 0;
        let _ = self
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |reserved| {
                grant = want
                    .min(self.max.saturating_sub(reserved))
                    .max(MIN_GRANT.min(want));
                Some(reserved + grant)
            });
        grant
    }

    pub(super) fn release(&self, grant: u64) {
        self.reserved.fetch_sub(grant, Ordering::AcqRel);
    }

    /// Bytes reserved now.
    #[cfg(test)]
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }
}

/// Backpressure settings of one connection.
#[derive(Clone, Debug)]
pub struct Budget {
    /// Most bytes one direction may hold in the peer's backlog (route `max_buffered`).
    pub per_direction: u64,
    /// The global pool (`max_buffered_total`).
    pub pool: Arc<Pool>,
}

/// One connection's share of the global pool, given back when dropped.
pub(super) struct Reservation<'a> {
    pub(super) pool: &'a Pool,
    pub(super) grants: [u64; 2],
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        for grant in self.grants {
            self.pool.release(grant);
        }
    }
}
