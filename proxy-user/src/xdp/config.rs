//! The configuration values of the XDP front: top-level `xdp`, per-route `allow`, `deny` and
//! `syn_rate`. Each parser checks one `toml::Value`; the configuration module adds the
//! file:line:column (of the element at fault, for lists: [`ListError::index`]).
use toml::Value;

use super::rules::Prefix;

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

fn strings(v: &Value, example: &str) -> Result<Vec<String>, ListError> {
    let Value::Array(items) = v else {
        return Err(ListError::whole(format!(
            "expected a list of strings, found {}; write e.g. {example}",
            v.type_str()
        )));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(ListError::at(
                i,
                format!("expected a string, found {}", other.type_str()),
            )),
        })
        .collect()
}

/// `xdp = ["eth0", ...]`: fixed interface names, no duplicates. May be empty (no XDP front).
pub fn parse_interfaces(v: &Value) -> Result<Vec<String>, ListError> {
    let names = strings(v, r#"xdp = ["eth0"]"#)?;
    for (i, name) in names.iter().enumerate() {
        if name.contains(['*', '?', '[', '+']) {
            return Err(ListError::at(
                i,
                format!("{name:?}: interface names are fixed, not patterns; list each interface"),
            ));
        }
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
        if names[..i].contains(name) {
            return Err(ListError::at(i, format!("{name:?} is listed twice")));
        }
    }
    Ok(names)
}

/// `allow` (`key == "allow"`) or `deny`: a list of prefixes. An empty `allow` would refuse
/// every source, so it is an error; an empty `deny` denies nothing.
pub fn parse_prefixes(v: &Value, key: &str) -> Result<Vec<Prefix>, ListError> {
    let example = format!(r#"{key} = ["198.51.100.0/24", "2001:db8:1::/48"]"#);
    let texts = strings(v, &example)?;
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
            .map_err(|e: super::rules::PrefixError| ListError::at(i, e.to_string()))?;
        if prefixes.contains(&prefix) {
            return Err(ListError::at(i, format!("{prefix} is listed twice")));
        }
        prefixes.push(prefix);
    }
    Ok(prefixes)
}

/// `syn_rate = N`: new connections per second per source, 1 to [`SYN_RATE_MAX`].
pub fn parse_syn_rate(v: &Value) -> Result<u32, String> {
    match v {
        Value::Integer(n) if (1..=SYN_RATE_MAX).contains(n) => Ok(*n as u32),
        Value::Integer(n) => Err(format!(
            "{n} is out of range: 1 to {SYN_RATE_MAX} new connections per second per source \
             (remove `syn_rate` for no limit)"
        )),
        other => Err(format!(
            "expected an integer (connections per second per source), found {}; write e.g. \
             syn_rate = 20",
            other.type_str()
        )),
    }
}

/// Byte offset of list element `index` inside `text`, the source of a list value (its span):
/// the start of the `index`-th string literal, for errors that point at the element.
pub fn element_offset(text: &str, index: usize) -> Option<usize> {
    let mut seen = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            '#' => {
                for (_, c) in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' | '\'' => {
                if seen == index {
                    return Some(at);
                }
                seen += 1;
                let mut escaped = false;
                for (_, d) in chars.by_ref() {
                    if d == c && !escaped {
                        break;
                    }
                    escaped = c == '"' && d == '\\' && !escaped;
                }
            }
            _ => {}
        }
    }
    None
}
