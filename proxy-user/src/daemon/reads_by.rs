//! The time a connection's reads before its dial may take: a front proxy's PROXY header, then
//! the peek, share one route `peek_timeout`, so a slow sender cannot hold a connection twice as
//! long by spending the time before each.
use std::time::Duration;

use tokio::time::Instant;

/// One `peek_timeout` for every read before the dial, counted from the first of them: the
/// clock is read only on connections that read (routes with `accept_proxy` or matches), not on
/// every connection.
pub(super) struct ReadsBy {
    timeout: Duration,
    deadline: Option<Instant>,
}

impl ReadsBy {
    pub(super) fn new(timeout: Duration) -> ReadsBy {
        ReadsBy {
            timeout,
            deadline: None,
        }
    }

    /// The time left for the next read; the first call starts the clock.
    pub(super) fn left(&mut self) -> Duration {
        let now = Instant::now();
        let deadline = *self.deadline.get_or_insert(now + self.timeout);
        deadline.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_second_read_gets_what_the_first_left() {
        let mut reads = ReadsBy::new(Duration::from_secs(2));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            reads.left(),
            Duration::from_secs(2),
            "the clock starts at the first read"
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(reads.left(), Duration::from_millis(800));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(reads.left(), Duration::ZERO);
    }
}
