//! The log lines' timestamp: the text `tracing_subscriber`'s `SystemTime` writes (RFC 3339 in
//! UTC with microseconds, `2026-11-30T20:27:24.191949Z`), with the date and time of day kept per
//! thread for the second they name. Formatting the whole date anew for every line (seven
//! numbers through `core::fmt`) was about a fifth of the per-connection log line's cost, which
//! is itself 3.7 % of the daemon's CPU per short connection; a second holds thousands of
//! lines. Own code because no maintained crate offers a cached `FormatTime`.
use std::{
    cell::RefCell,
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

use tracing_subscriber::fmt::{format::Writer, time::FormatTime};

/// [`FormatTime`] for the daemon's log lines.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogTime;

thread_local! {
    /// The second last formatted on this thread and its text up to the seconds
    /// (`2026-11-30T20:27:24`).
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for LogTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        write_time(w, SystemTime::now())
    }
}

/// Writes `at` as `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` (a time before 1970 as 1970's first second).
fn write_time(w: &mut impl fmt::Write, at: SystemTime) -> fmt::Result {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (secs, micros) = (since.as_secs(), since.subsec_micros());
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            *second = secs;
            text.clear();
            date_and_time(text, secs)?;
        }
        w.write_str(text)
    })?;
    let mut frac = *b".000000Z";
    let mut rest = micros;
    for digit in frac[1..7].iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    // The bytes are ASCII digits and punctuation.
    w.write_str(std::str::from_utf8(&frac).map_err(|_| fmt::Error)?)
}

/// `YYYY-MM-DDTHH:MM:SS` for `secs` after the epoch, in UTC.
fn date_and_time(out: &mut String, secs: u64) -> fmt::Result {
    use fmt::Write as _;
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
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
        assert_eq!(text(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(text(1_796_070_444, 191_949), "2026-11-30T20:27:24.191949Z");
        assert_eq!(text(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
        // The cache is per second: the next second on the same thread is formatted anew.
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
