//! The configuration values of the XDP front: top-level `xdp`, per-route `allow`, `deny` and
//! `syn_rate`. The configuration module checks the TOML types (a list of strings, an integer)
//! and adds the file:line:column: of the element at fault ([`ListError::index`]) for lists.
use super::rules::{Prefix, PrefixError};

/// A list value with a bad element (`index`) or a bad whole (`index: None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListError {
    /// The element at fault, if one is.
    pub index: Option<usize>,
    pub message: String,
}

impl ListError {
    fn whole(message: impl Into<String>) -> ListError {
        ListError {
            index: None,
            message: message.into(),
        }
    }

    fn at(index: usize, message: impl Into<String>) -> ListError {
        ListError {
            index: Some(index),
            message: message.into(),
        }
    }
}

/// Longest interface name the kernel takes (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// Largest `syn_rate`: beyond this a per-source limit protects nothing.
pub const SYN_RATE_MAX: i64 = 1_000_000;

/// `xdp = ["eth0", ...]`: fixed interface names, no duplicates. May be empty (no XDP front).
pub fn parse_interfaces(names: &[&str]) -> Result<Vec<String>, ListError> {
    for (i, name) in names.iter().enumerate() {
        if name.contains(['*', '?', '[', '+']) {
            return Err(ListError::at(
                i,
                format!("{name:?}: interface names are fixed, not patterns; list each interface"),
            ));
        }
        let name = *name;
        let bad_char = name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
        if name.is_empty() || name.len() > IFNAME_MAX || bad_char || name == "." || name == ".." {
            return Err(ListError::at(
                i,
                format!(
                    "{name:?} is not an interface name (1 to {IFNAME_MAX} bytes, no '/', ':' or \
                     spaces; see `ip link`)"
                ),
            ));
        }
        if names[..i].contains(&name) {
            return Err(ListError::at(i, format!("{name:?} is listed twice")));
        }
    }
    Ok(names.iter().map(|n| n.to_string()).collect())
}

/// `xdp_mode`: how the front attaches to the interfaces in `xdp`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpModeChoice {
    /// Native mode where the driver has it, else generic (the default).
    #[default]
    Auto,
    /// Generic mode everywhere. For a veth: native XDP on it turns off segmentation offload on
    /// its peer, which makes transfers into it several times slower (docs/xdp.md, "Cost").
    Generic,
}

impl XdpModeChoice {
    pub const ALL: [XdpModeChoice; 2] = [XdpModeChoice::Auto, XdpModeChoice::Generic];

    pub fn as_str(self) -> &'static str {
        match self {
            XdpModeChoice::Auto => "auto",
            XdpModeChoice::Generic => "generic",
        }
    }
}

/// `allow` (`key == "allow"`) or `deny`: a list of prefixes. An empty `allow` would refuse
/// every source, so it is an error; an empty `deny` denies nothing.
pub fn parse_prefixes(texts: &[&str], key: &str) -> Result<Vec<Prefix>, ListError> {
    if texts.is_empty() && key == "allow" {
        return Err(ListError::whole(
            "an empty allow list would refuse every source; remove `allow` to let every source \
             in, or list the prefixes that may connect",
        ));
    }
    let mut prefixes: Vec<Prefix> = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let prefix: Prefix = text
            .parse()
            .map_err(|e: PrefixError| ListError::at(i, e.to_string()))?;
        if prefixes.contains(&prefix) {
            return Err(ListError::at(i, format!("{prefix} is listed twice")));
        }
        prefixes.push(prefix);
    }
    Ok(prefixes)
}

/// A `syn_rate` out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0} is out of range: 1 to {SYN_RATE_MAX} new connections per second per source (remove \
     `syn_rate` for no limit)"
)]
pub struct RateError(pub i64);

/// `syn_rate = N`: new connections per second per source, 1 to [`SYN_RATE_MAX`].
pub fn parse_syn_rate(n: i64) -> Result<u32, RateError> {
    u32::try_from(n)
        .ok()
        .filter(|r| (1..=SYN_RATE_MAX).contains(&i64::from(*r)))
        .ok_or(RateError(n))
}
