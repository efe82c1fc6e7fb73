//! What is wrong with one value of the configuration and how to write it instead. The text is
//! the whole error: a value has no underlying cause to keep. The configuration adds the file,
//! line, column and key ([`crate::config::ConfigError`]).
use std::fmt;

/// A problem with one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem(pub String);

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Problem {}

impl From<&str> for Problem {
    fn from(s: &str) -> Problem {
        Problem(s.to_owned())
    }
}

impl From<String> for Problem {
    fn from(s: String) -> Problem {
        Problem(s)
    }
}

impl From<Problem> for String {
    fn from(p: Problem) -> String {
        p.0
    }
}

impl PartialEq<&str> for Problem {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// `problem!("{x} is out of range")`: a [`Problem`] from a format string.
macro_rules! problem {
    ($($arg:tt)*) => { $crate::problem::Problem(format!($($arg)*)) };
}
pub(crate) use problem;
