//! The configuration forms of `upstream`, `balance` and `health_check` (on a route or a routing
//! match). The configuration module owns the grammar of single values (addresses, durations) and
//! passes it in as [`Grammar`]; this module owns the shapes:
//!
//! ```toml
//! upstream = "[fe80::1%lxdbr0]:80"                           # one server
//! upstream = ["[fe80::1%lxdbr0]:80", "app.lxd:80"]           # several
//! upstream = [{ address = "10.0.0.3:5432", weight = 3 },     # tables, strings may mix in
//!             { address = "10.0.0.4:5432", backup = true }]
//! balance = "roundrobin"                                     # | leastconn | source
//! health_check = { interval = "2s", timeout = "1s", rise = 2, fall = 3 }   # each optional
//! ```
use std::time::Duration;

use toml::Value;

use super::{Balance, HealthCheck, ServerSpec, MAX_RISE_FALL, MAX_WEIGHT};
use crate::addr::Endpoint;

/// The value grammar the configuration module provides.
pub struct Grammar<'a> {
    /// An upstream address, checked (zone interfaces exist, port not 0).
    pub address: &'a dyn Fn(&str) -> Result<Endpoint, String>,
    /// A duration such as `"2s"`.
    pub duration: &'a dyn Fn(&Value) -> Result<Duration, String>,
}

/// One problem in a value, `at` the key path below it: `""`, `"[1]"`, `"[1].weight"`,
/// `".interval"`.
#[derive(Debug, PartialEq, Eq)]
pub struct Problem {
    pub at: String,
    pub message: String,
}

fn problem(at: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        at: at.into(),
        message: message.into(),
    }
}

/// What a value is, for messages: `a boolean (true)`, `an array`.
fn describe(value: &Value) -> String {
    let article = match value.type_str() {
        "integer" | "array" => "an",
        _ => "a",
    };
    match value {
        Value::Integer(_) | Value::Float(_) | Value::Boolean(_) => {
            format!("{article} {} ({value})", value.type_str())
        }
        _ => format!("{article} {}", value.type_str()),
    }
}

const UPSTREAM_FORMS: &str = "write upstream = \"10.0.0.2:80\", a list of addresses, or a list \
                              of tables such as { address = \"10.0.0.2:80\", weight = 2 }";

/// `upstream`: a string, or a non-empty list of strings and `{address, weight, backup}` tables.
/// Every problem is reported; at least one server must be a primary.
pub fn servers(value: &Value, grammar: &Grammar<'_>) -> Result<Vec<ServerSpec>, Vec<Problem>> {
    let items: Vec<&Value> = match value {
        Value::String(_) => vec![value],
        Value::Array(items) if items.is_empty() => {
            return Err(vec![problem(
                "",
                format!("the list is empty; {UPSTREAM_FORMS}"),
            )]);
        }
        Value::Array(items) => items.iter().collect(),
        other => {
            return Err(vec![problem(
                "",
                format!(
                    "expected an address or a list, found {}; {UPSTREAM_FORMS}",
                    describe(other)
                ),
            )]);
        }
    };
    let listed = matches!(value, Value::Array(_));
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let at = if listed {
            format!("[{i}]")
        } else {
            String::new()
        };
        match server(item, &at, grammar) {
            Ok(s) => {
                if let Some(j) = out.iter().position(|o: &ServerSpec| o.address == s.address) {
                    problems.push(problem(
                        &at,
                        format!(
                            "\"{}\" is already upstream[{j}]; list each server once (use weight \
                             to give it a larger share)",
                            s.address
                        ),
                    ));
                }
                out.push(s);
            }
            Err(mut p) => problems.append(&mut p),
        }
    }
    if problems.is_empty() && out.iter().all(|s| s.backup) {
        problems.push(problem(
            "",
            "every server is a backup, so none would ever be a primary; remove backup = true \
             from at least one",
        ));
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// One entry: an address string or a `{address, weight, backup}` table.
fn server(item: &Value, at: &str, grammar: &Grammar<'_>) -> Result<ServerSpec, Vec<Problem>> {
    let table = match item {
        Value::String(s) => {
            return (grammar.address)(s)
                .map(ServerSpec::new)
                .map_err(|m| vec![problem(at, m)]);
        }
        Value::Table(t) => t,
        other => {
            return Err(vec![problem(
                at,
                format!(
                    "expected an address or a table, found {}; write \"10.0.0.2:80\" or \
                     {{ address = \"10.0.0.2:80\", weight = 2 }}",
                    describe(other)
                ),
            )]);
        }
    };
    let mut problems = Vec::new();
    let mut spec = None;
    let (mut weight, mut backup) = (1, false);
    for (key, value) in table {
        let here = format!("{at}.{key}");
        let result = match key.as_str() {
            "address" => match value.as_str() {
                Some(s) => (grammar.address)(s).map(|e| spec = Some(e)),
                None => Err(format!(
                    "expected a string, found {}; write e.g. address = \"10.0.0.2:80\"",
                    describe(value)
                )),
            },
            "weight" => parse_weight(value).map(|w| weight = w),
            "backup" => match value {
                Value::Boolean(b) => {
                    backup = *b;
                    Ok(())
                }
                other => Err(format!(
                    "expected true or false, found {}; write e.g. backup = true",
                    describe(other)
                )),
            },
            _ => Err(
                "unknown key; valid keys of an upstream table are `address`, `weight`, \
                      `backup`"
                    .to_owned(),
            ),
        };
        if let Err(m) = result {
            problems.push(problem(here, m));
        }
    }
    if !table.contains_key("address") {
        problems.push(problem(
            at,
            "the table has no address; add e.g. address = \"10.0.0.2:80\"",
        ));
    }
    match spec {
        Some(address) if problems.is_empty() => Ok(ServerSpec {
            address,
            weight,
            backup,
        }),
        _ => Err(problems),
    }
}

fn parse_weight(value: &Value) -> Result<u32, String> {
    match value {
        Value::Integer(n) if (1..=i64::from(MAX_WEIGHT)).contains(n) => Ok(*n as u32),
        Value::Integer(n) => Err(format!(
            "{n} is out of range; use 1 to {MAX_WEIGHT} (a share relative to the other servers)"
        )),
        other => Err(format!(
            "expected an integer, found {}; write e.g. weight = 2",
            describe(other)
        )),
    }
}

/// `balance`.
pub fn balance(value: &Value) -> Result<Balance, String> {
    let valid = Balance::ALL.map(Balance::as_str).join(", ");
    let Some(s) = value.as_str() else {
        return Err(format!(
            "expected a string, found {}; use one of {valid}",
            describe(value)
        ));
    };
    Balance::ALL
        .into_iter()
        .find(|b| b.as_str() == s)
        .ok_or_else(|| format!("{s:?} is not a balance; use one of {valid}"))
}

/// The longest check `interval` (and `timeout`).
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// The shortest check `interval`: more often only loads the servers.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// `health_check = { interval, timeout, rise, fall }`, each optional (defaults: 2s, 1s, 2, 3);
/// the timeout may not exceed the interval.
pub fn health_check(value: &Value, grammar: &Grammar<'_>) -> Result<HealthCheck, Vec<Problem>> {
    let Value::Table(table) = value else {
        return Err(vec![problem(
            "",
            format!(
                "expected a table, found {}; write e.g. health_check = {{ interval = \"2s\", \
                 timeout = \"1s\", rise = 2, fall = 3 }}",
                describe(value)
            ),
        )]);
    };
    let mut hc = HealthCheck::default();
    let mut problems = Vec::new();
    for (key, value) in table {
        let result = match key.as_str() {
            "interval" => interval(value, grammar, "interval", "2s").map(|d| hc.interval = d),
            "timeout" => interval(value, grammar, "timeout", "1s").map(|d| hc.timeout = d),
            "rise" => count(value, "rise", 2).map(|n| hc.rise = n),
            "fall" => count(value, "fall", 3).map(|n| hc.fall = n),
            _ => Err(
                "unknown key; valid keys of health_check are `interval`, `timeout`, \
                      `rise`, `fall`"
                    .to_owned(),
            ),
        };
        if let Err(m) = result {
            problems.push(problem(format!(".{key}"), m));
        }
    }
    if problems.is_empty() && hc.timeout > hc.interval {
        let at = if table.contains_key("timeout") {
            ".timeout"
        } else {
            ".interval"
        };
        problems.push(problem(
            at,
            format!(
                "the timeout ({:?}) is longer than the interval ({:?}); a check must end \
                 before the next one starts: lower timeout or raise interval",
                hc.timeout, hc.interval
            ),
        ));
    }
    if problems.is_empty() {
        Ok(hc)
    } else {
        Err(problems)
    }
}

fn interval(
    value: &Value,
    grammar: &Grammar<'_>,
    key: &str,
    example: &str,
) -> Result<Duration, String> {
    let d = (grammar.duration)(value)?;
    if d < MIN_INTERVAL || d > MAX_INTERVAL {
        return Err(format!(
            "{value} is out of range; use 100ms to 1h, e.g. {key} = \"{example}\""
        ));
    }
    Ok(d)
}

fn count(value: &Value, key: &str, example: u32) -> Result<u32, String> {
    match value {
        Value::Integer(n) if (1..=i64::from(MAX_RISE_FALL)).contains(n) => Ok(*n as u32),
        Value::Integer(n) => Err(format!(
            "{n} is out of range; use 1 to {MAX_RISE_FALL}, e.g. {key} = {example}"
        )),
        other => Err(format!(
            "expected an integer, found {}; write e.g. {key} = {example}",
            describe(other)
        )),
    }
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod tests;
