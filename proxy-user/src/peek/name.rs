//! Host names as routing compares them: lower case, no trailing dot, validated; and the
//! patterns a match lists (`blog.example.com`, `*.example.org`).
use std::fmt;
use std::net::IpAddr;

/// The longest DNS name (RFC 1035 2.3.4, without the trailing dot).
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// Why a name in the configuration cannot be routed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error("{0} is an IP address: clients send names, never addresses, in SNI and Host")]
    IpLiteral(String),
    #[error("the name is longer than 253 characters")]
    TooLong,
    #[error("label {0:?} is empty or longer than 63 characters")]
    LabelLength(String),
    #[error("label {0:?} holds a character other than a-z, 0-9, '-' and '_', or starts or ends with '-'")]
    LabelCharacters(String),
    #[error("a wildcard is only allowed as the whole first label, as in \"*.example.com\"")]
    Wildcard,
    #[error("the last label {0:?} is all digits (an address, not a name)")]
    NumericTld(String),
}

/// Lower-cases and drops one trailing dot, the form names are compared in.
pub fn normalize(name: &str) -> String {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.to_ascii_lowercase()
}

/// A name as a client sent it (SNI bytes), normalised; bytes that are not printable ASCII are
/// escaped so the log line stays one line and such a name can never match a pattern.
pub fn from_wire(bytes: &[u8]) -> String {
    let text: String = bytes.escape_ascii().to_string();
    normalize(&text)
}

/// Checks a normalised name (no wildcard) the way routing needs it.
pub fn validate(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return Err(NameError::IpLiteral(name.to_string()));
    }
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong);
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > MAX_LABEL {
            return Err(NameError::LabelLength(label.to_string()));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if label.contains('*') {
            return Err(NameError::Wildcard);
        }
        if !label.chars().all(allowed) || label.starts_with('-') || label.ends_with('-') {
            return Err(NameError::LabelCharacters(label.to_string()));
        }
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.chars().all(|c| c.is_ascii_digit()) {
        return Err(NameError::NumericTld(last.to_string()));
    }
    Ok(())
}

/// One entry of a match's `sni` or `host` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamePattern {
    /// The name itself.
    Exact(String),
    /// `*.suffix`: any name with one or more labels before `.suffix` (not `suffix` itself).
    Suffix(String),
}

impl NamePattern {
    /// Parses a pattern from the configuration: case and a trailing dot are ignored.
    pub fn parse(text: &str) -> Result<NamePattern, NameError> {
        let text = normalize(text);
        match text.strip_prefix("*.") {
            Some(suffix) => validate(suffix).map(|()| NamePattern::Suffix(suffix.to_string())),
            None => validate(&text).map(|()| NamePattern::Exact(text)),
        }
    }

    /// Whether a normalised name from a client matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(exact) => name == exact,
            NamePattern::Suffix(suffix) => name
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|head| !head.is_empty() && validate(name).is_ok()),
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(name) => f.write_str(name),
            NamePattern::Suffix(suffix) => write!(f, "*.{suffix}"),
        }
    }
}
