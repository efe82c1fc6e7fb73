//! Where a connection goes once its first bytes have been read: a pure function of the
//! verdict, the route's matches and whether it has a default upstream.
use super::{first_match, http, tls, Match, Protocol, Verdict};

/// What to do with a connection after the peek.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The match at this index (0-based, file order) applies.
    Matched(usize),
    /// No match applies (or the client was silent): the route's default upstream.
    Default,
    /// No match and no default: write `reply` (if any) to the client and close.
    Refuse {
        /// The TLS alert or the HTTP 421 response; `None` for other protocols.
        reply: Option<&'static [u8]>,
    },
    /// The first bytes cannot be routed on (broken, cut short, too long): close.
    Close,
}

/// How a peek ended, for counters and the log: one word each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A match applied.
    Matched,
    /// The default upstream was taken because no match applied.
    Default,
    /// The client sent nothing within `peek_timeout` and went to the default upstream.
    SilentDefault,
    /// No match and no default.
    NoMatch,
    /// The client sent nothing within `peek_timeout` and there is no default.
    Silent,
    /// Bytes came but stopped short of a decision within `peek_timeout`.
    Timeout,
    /// The client closed or failed before its first bytes were complete.
    Closed,
    /// The first bytes broke their protocol or its limits.
    Malformed,
}

impl Outcome {
    /// Every outcome, in the order metrics list them.
    pub const ALL: [Outcome; 8] = [
        Outcome::Matched,
        Outcome::Default,
        Outcome::SilentDefault,
        Outcome::NoMatch,
        Outcome::Silent,
        Outcome::Timeout,
        Outcome::Closed,
        Outcome::Malformed,
    ];

    /// The label value used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Matched => "matched",
            Outcome::Default => "default",
            Outcome::SilentDefault => "silent_default",
            Outcome::NoMatch => "no_match",
            Outcome::Silent => "silent",
            Outcome::Timeout => "timeout",
            Outcome::Closed => "closed",
            Outcome::Malformed => "malformed",
        }
    }

    /// The position in [`Outcome::ALL`], for counter arrays.
    pub fn index(self) -> usize {
        Outcome::ALL.iter().position(|o| *o == self).unwrap_or(0)
    }
}

/// Chooses what happens to a connection whose first bytes gave `verdict`.
pub fn decide<'a>(
    verdict: &Verdict,
    rules: impl IntoIterator<Item = &'a Match>,
    has_default: bool,
) -> (Decision, Outcome) {
    match verdict {
        Verdict::Peeked(seen) => match first_match(rules, seen) {
            Some(i) => (Decision::Matched(i), Outcome::Matched),
            None if has_default => (Decision::Default, Outcome::Default),
            None => {
                let reply: Option<&'static [u8]> = match seen.protocol {
                    Protocol::Tls => Some(&ALERT),
                    Protocol::Http => Some(http::misdirected_response()),
                    Protocol::Other => None,
                };
                (Decision::Refuse { reply }, Outcome::NoMatch)
            }
        },
        Verdict::Silent if has_default => (Decision::Default, Outcome::SilentDefault),
        Verdict::Silent => (Decision::Close, Outcome::Silent),
        Verdict::Stalled => (Decision::Close, Outcome::Timeout),
        Verdict::Closed | Verdict::Failed(_) => (Decision::Close, Outcome::Closed),
        Verdict::Malformed(_) => (Decision::Close, Outcome::Malformed),
    }
}

static ALERT: [u8; 7] = tls::UNRECOGNIZED_NAME_ALERT;
