//! Values of the file: each parser takes an item, checks its type and range, and says what is
//! wrong and what would be valid.
use std::time::Duration;

use toml_edit::{Item, Value};

use super::{
    check_zone,
    document::{self, describe},
    Mode, DEFAULT_CONTROL_SOCKET, MAX_CONNECTIONS, MAX_CONNECT_TIMEOUT, MAX_IDLE_TIMEOUT,
    MAX_MAX_BUFFERED, MAX_MAX_BUFFERED_TOTAL, MAX_SEND_BUFFER, MAX_WORKERS, MIN_MAX_BUFFERED,
};
use crate::{
    addr::{self, Endpoint},
    xdp::config::XdpModeChoice,
};

use crate::problem::problem;
pub use crate::problem::Problem;

/// Levenshtein distance, for "did you mean" hints.
pub(super) use strsim::levenshtein as edit_distance;

/// An item as written in the file, for messages.
fn show(item: &Item) -> String {
    match item {
        Item::Value(v) => document::show(v),
        other => describe(other),
    }
}

fn expect_str<'v>(value: &'v Item, example: &str) -> Result<&'v str, Problem> {
    value.as_str().ok_or_else(|| {
        problem!(
            "expected a string, found {}; write e.g. {example}",
            describe(value)
        )
    })
}

pub(super) fn unknown_key(key: &str, valid: &[&str], table: &str) -> Problem {
    let suggestion = valid
        .iter()
        .map(|v| (edit_distance(key, v), v))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, v)| format!("did you mean `{v}`? "))
        .unwrap_or_default();
    let names: Vec<String> = valid
        .iter()
        .map(|&v| match v {
            "route" => "[[route]] tables".to_owned(),
            _ => format!("`{v}`"),
        })
        .collect();
    problem!(
        "unknown key; {suggestion}valid {table} keys are {}",
        names.join(", ")
    )
}

pub(super) fn mode(value: &Item) -> Result<Mode, Problem> {
    let valid = Mode::ALL.map(Mode::as_str).join(", ");
    let s = expect_str(value, "mode = \"auto\"")?;
    Mode::ALL
        .into_iter()
        .find(|m| m.as_str() == s)
        .ok_or_else(|| problem!("{s:?} is not a mode; use one of {valid}"))
}

/// `xdp_mode = "auto" | "generic"`.
pub(super) fn xdp_mode(value: &Item) -> Result<XdpModeChoice, Problem> {
    let s = expect_str(value, "xdp_mode = \"generic\"")?;
    XdpModeChoice::ALL
        .into_iter()
        .find(|m| m.as_str() == s)
        .ok_or_else(|| {
            problem!(
                "{s:?} is not an XDP mode; use \"auto\" (native where the driver has it, else \
                 generic) or \"generic\" (generic everywhere: for a veth, whose peer loses its \
                 segmentation offload under native XDP)"
            )
        })
}

pub(super) fn route_name(value: &Item) -> Result<String, Problem> {
    let s = expect_str(value, "name = \"web\"")?;
    if s.is_empty() {
        return Err(
            "the name is empty; use letters, digits, '_', '.' and '-', e.g. \"web\"".into(),
        );
    }
    if let Some(c) = s
        .chars()
        .find(|c| !c.is_ascii_alphanumeric() && !matches!(c, '_' | '.' | '-'))
    {
        return Err(problem!(
            "{s:?} contains {c:?}; a route name may only contain letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(s.to_owned())
}

pub(super) fn listen(value: &Item) -> Result<Endpoint, Problem> {
    let s = expect_str(value, "listen = \"127.0.0.1:8080\"")?;
    let endpoint = Endpoint::parse_listen(s).map_err(|e| Problem(e.to_string()))?;
    check_zone(&endpoint)?;
    Ok(endpoint)
}

/// One upstream address (one server of the `upstream` key).
pub(super) fn upstream(s: &str) -> Result<Endpoint, Problem> {
    let endpoint = s.parse::<Endpoint>().map_err(|e| Problem(e.to_string()))?;
    check_zone(&endpoint)?;
    Ok(endpoint)
}

pub(super) fn interface(value: &Item) -> Result<String, Problem> {
    let s = expect_str(value, "interface = \"eth0\"")?;
    addr::validate_interface_name(s).map_err(|e| Problem(e.to_string()))?;
    if !addr::interface_exists(s) {
        return Err(problem!(
            "interface {s:?} does not exist on this machine; fix the name or create the \
             interface first (ip link shows the interfaces)"
        ));
    }
    Ok(s.to_owned())
}

const DURATION_HINT: &str = "use a number with a unit, e.g. \"5s\" or \"250ms\"";

pub(super) fn duration(value: &Item) -> Result<Duration, Problem> {
    let s = match value {
        Item::Value(Value::String(s)) => s.value().as_str(),
        Item::Value(Value::Integer(n)) => {
            let n = *n.value();
            return Err(problem!("{n} has no unit; {DURATION_HINT}, e.g. \"{n}s\""));
        }
        other => {
            return Err(problem!(
                "expected a duration, found {}; {DURATION_HINT}",
                describe(other)
            ))
        }
    };
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = s.split_at(digits);
    let scale_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(problem!("{s:?} is not a duration; {DURATION_HINT}")),
    };
    let millis = number
        .parse::<u64>()
        .map_err(|_| problem!("{s:?} is not a duration; {DURATION_HINT}"))?
        .checked_mul(scale_ms)
        .ok_or_else(|| problem!("{s:?} is too long; {DURATION_HINT}"))?;
    Ok(Duration::from_millis(millis))
}

pub(super) fn connect_timeout(value: &Item) -> Result<Duration, Problem> {
    let d = duration(value)?;
    if d.is_zero() {
        return Err("must be more than 0; e.g. \"5s\"".into());
    }
    if d > MAX_CONNECT_TIMEOUT {
        return Err(problem!(
            "{} is longer than the limit of 1h; use at most \"1h\", e.g. \"5s\"",
            show(value)
        ));
    }
    Ok(d)
}

pub(super) fn idle_timeout(value: &Item) -> Result<Duration, Problem> {
    let d = duration(value)?;
    if d.is_zero() {
        return Err(
            "must be more than 0; e.g. \"10m\" (leave the key out for no idle timeout)".into(),
        );
    }
    if d > MAX_IDLE_TIMEOUT {
        return Err(problem!(
            "{} is longer than the limit of 168h (a week); use at most \"168h\", or leave \
             the key out for no idle timeout",
            show(value)
        ));
    }
    Ok(d)
}

/// `sockaddr_un.sun_path` holds 108 bytes with the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

pub(super) fn control_socket(value: &Item) -> Result<std::path::PathBuf, Problem> {
    let s = expect_str(
        value,
        &format!("control_socket = \"{DEFAULT_CONTROL_SOCKET}\""),
    )?;
    if !s.starts_with('/') {
        return Err(problem!(
            "{s:?} is not an absolute path; write e.g. \"{DEFAULT_CONTROL_SOCKET}\""
        ));
    }
    if s.len() > MAX_SOCKET_PATH || s.ends_with('/') || s.contains('\0') {
        return Err(problem!(
            "{s:?} cannot name a Unix socket (a file path of at most {MAX_SOCKET_PATH} bytes, \
             no NUL); write e.g. \"{DEFAULT_CONTROL_SOCKET}\""
        ));
    }
    Ok(s.into())
}

pub(super) fn user(value: &Item) -> Result<String, Problem> {
    let s = expect_str(value, "user = \"spliced\"")?;
    crate::privdrop::lookup(s).map_err(|e| Problem(e.to_string()))?;
    Ok(s.to_owned())
}

pub(super) fn metrics(value: &Item) -> Result<Endpoint, Problem> {
    let s = expect_str(value, "metrics = \"127.0.0.1:9180\"")?;
    // Port 0 is allowed (tests); the bound address is logged.
    let endpoint = Endpoint::parse_listen(s).map_err(|e| Problem(e.to_string()))?;
    check_zone(&endpoint)?;
    Ok(endpoint)
}

const SIZE_HINT: &str =
    "use a number of bytes or a binary unit, e.g. 4096, \"512KiB\", \"16MiB\" or \"1GiB\"";

/// A size in bytes: an integer, or a string with an optional unit `B`, `KiB`, `MiB` or `GiB`.
pub(super) fn size(value: &Item) -> Result<u64, Problem> {
    let s = match value {
        Item::Value(Value::Integer(n)) => {
            let n = *n.value();
            return u64::try_from(n).map_err(|_| problem!("{n} is negative; {SIZE_HINT}"));
        }
        Item::Value(Value::String(s)) => s.value().as_str(),
        other => {
            return Err(problem!(
                "expected a size, found {}; {SIZE_HINT}",
                describe(other)
            ))
        }
    };
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = s.split_at(digits);
    let shift = match unit {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "k" | "K" | "KB" | "kB" | "M" | "MB" | "G" | "GB" => {
            let binary = match unit.as_bytes()[0].to_ascii_uppercase() {
                b'K' => "KiB",
                b'M' => "MiB",
                _ => "GiB",
            };
            return Err(problem!(
                "{s:?}: write the binary unit \"{number}{binary}\" (decimal units are ambiguous); \
                 {SIZE_HINT}"
            ));
        }
        _ => return Err(problem!("{s:?} is not a size; {SIZE_HINT}")),
    };
    number
        .parse::<u64>()
        .map_err(|_| problem!("{s:?} is not a size; {SIZE_HINT}"))?
        .checked_mul(1 << shift)
        .ok_or_else(|| problem!("{s:?} is too large; {SIZE_HINT}"))
}

pub(super) fn send_buffer(value: &Item) -> Result<Option<usize>, Problem> {
    let bytes = size(value)?;
    if bytes > MAX_SEND_BUFFER as u64 {
        return Err(problem!(
            "{} is more than the maximum of 1GiB; use e.g. \"16MiB\", or 0 for the \
             kernel's autotuning",
            show(value)
        ));
    }
    // At most 1 GiB, so it fits in usize.
    Ok((bytes != 0).then_some(bytes as usize))
}

pub(super) fn max_buffered(value: &Item) -> Result<u64, Problem> {
    let bytes = size(value)?;
    if !(MIN_MAX_BUFFERED..=MAX_MAX_BUFFERED).contains(&bytes) {
        return Err(problem!(
            "{} is out of range; use 64KiB to 1GiB, e.g. max_buffered = \"16MiB\"",
            show(value)
        ));
    }
    Ok(bytes)
}

pub(super) fn max_buffered_total(value: &Item) -> Result<u64, Problem> {
    let bytes = size(value)?;
    if !(MIN_MAX_BUFFERED..=MAX_MAX_BUFFERED_TOTAL).contains(&bytes) {
        return Err(problem!(
            "{} is out of range; use 64KiB to 64GiB, e.g. max_buffered_total = \"512MiB\"",
            show(value)
        ));
    }
    Ok(bytes)
}

pub(super) fn max_connections(value: &Item) -> Result<usize, Problem> {
    count(value, MAX_CONNECTIONS, "max_connections = 10000")
}

/// `true` or `false`; `example` shows the key.
pub(super) fn boolean(value: &Item, example: &str) -> Result<bool, Problem> {
    match value {
        Item::Value(Value::Boolean(b)) => Ok(*b.value()),
        other => Err(problem!(
            "expected true or false, found {}; write e.g. {example}",
            describe(other)
        )),
    }
}

/// `workers = 2`.
pub(super) fn workers(value: &Item) -> Result<usize, Problem> {
    count(
        value,
        MAX_WORKERS,
        "workers = 2 (or leave it out: one per core)",
    )
}

/// A whole number from 1 to `max`.
fn count(value: &Item, max: usize, example: &str) -> Result<usize, Problem> {
    let n = match value {
        Item::Value(Value::Integer(n)) => *n.value(),
        other => {
            return Err(problem!(
                "expected an integer, found {}; write e.g. {example}",
                describe(other)
            ))
        }
    };
    match usize::try_from(n) {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(problem!(
            "{n} is out of range; use 1 to {max}, e.g. {example}"
        )),
    }
}

/// `4194304` -> `4MiB`, for messages.
pub(super) fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// `syn_rate`: new connections per second per source (see [`crate::xdp::config`]).
pub(super) fn syn_rate(value: &Item) -> Result<u32, Problem> {
    match value.as_integer() {
        Some(n) => crate::xdp::config::parse_syn_rate(n).map_err(|e| Problem(e.to_string())),
        None => Err(problem!(
            "expected an integer (new connections per second per source), found {}; write e.g. \
             syn_rate = 20",
            describe(value)
        )),
    }
}
