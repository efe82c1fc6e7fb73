//! The log lines' timestamp: the text `tracing_subscriber`'s `SystemTime` writes (RFC 3339 in
//! UTC with microseconds, `2026-11-30T20:27:24.191949Z`), written by `humantime` into one
//! buffer. tracing-subscriber formats its date's seven numbers one by one through `core::fmt`,
//! about a fifth of the per-connection log line's cost, which is itself 3.7 % of the daemon's
//! CPU per short connection.
use std::{
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

use tracing_subscriber::fmt::{format::Writer, time::FormatTime};

/// [`FormatTime`] for the daemon's log lines.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogTime;

impl FormatTime for LogTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        write_time(w, SystemTime::now())
    }
}

/// Writes `at` as `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` (a clock before 1970 as 1970's first second:
/// humantime panics on it).
fn write_time(w: &mut impl fmt::Write, at: SystemTime) -> fmt::Result {
    write!(
        w,
        "{}",
        humantime::format_rfc3339_micros(at.max(UNIX_EPOCH))
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn text(secs: u64, micros: u32) -> String {
        let mut s = String::new();
        let at = UNIX_EPOCH + Duration::new(secs, micros * 1000);
        write_time(&mut s, at).unwrap();
        s
    }

    #[test]
    fn known_instants() {
        assert_eq!(text(0, 0), "1970-01-01T00:00:00.000000Z");
        let before = UNIX_EPOCH - Duration::from_secs(1);
        let mut s = String::new();
        write_time(&mut s, before).unwrap();
        assert_eq!(s, "1970-01-01T00:00:00.000000Z");
        assert_eq!(text(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(text(1_796_070_444, 191_949), "2026-11-30T20:27:24.191949Z");
        assert_eq!(text(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
        assert_eq!(text(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
    }

    /// The same text as tracing-subscriber's own `SystemTime` for the same moment (read twice
    /// around the other; a second boundary in between is retried).
    #[test]
    fn matches_tracing_subscribers_system_time() {
        for _ in 0..3 {
            let mut theirs = String::new();
            let mut ours = String::new();
            tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut Writer::new(&mut theirs))
                .unwrap();
            LogTime.format_time(&mut Writer::new(&mut ours)).unwrap();
            assert_eq!(theirs.len(), ours.len(), "{theirs} against {ours}");
            // Equal up to the second; the microseconds differ by the time between the reads.
            if theirs[..19] == ours[..19] {
                assert!(ours.ends_with('Z'));
                return;
            }
        }
        panic!("the second changed between every pair of reads");
    }
}
