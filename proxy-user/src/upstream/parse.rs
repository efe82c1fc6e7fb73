//! The configuration forms of `upstream`, `balance` and `health_check` (on a route or a routing
//! match), read from the document's items so that each problem keeps its own place. The
//! configuration module owns the grammar of single values (addresses, durations) and passes it
//! in as [`Grammar`]; this module owns the shapes:
//!
//! ```toml
//! upstream = "[fe80::1%lxdbr0]:80"                           # one server
//! upstream = ["[fe80::1%lxdbr0]:80", "app.lxd:80"]           # several
//! upstream = [{ address = "10.0.0.3:5432", weight = 3 },     # tables, strings may mix in
//!             { address = "10.0.0.4:5432", backup = true }]
//! balance = "roundrobin"                                     # | leastconn | source
//! health_check = { interval = "2s", timeout = "1s", rise = 2, fall = 3 }   # each optional
//! ```
//!
//! `[[route.upstream]]` tables and a `[route.health_check]` table are the same as the inline
//! forms.
use std::{ops::Range, time::Duration};

use toml_edit::{Item, TableLike, Value};

use super::{Balance, HealthCheck, ServerSpec, MAX_RISE_FALL, MAX_WEIGHT};
use crate::{
    addr::Endpoint,
    problem::{problem, Problem as Invalid},
};

/// The value grammar the configuration module provides.
pub struct Grammar<'a> {
    /// An upstream address, checked (zone interfaces exist, port not 0).
    pub address: &'a dyn Fn(&str) -> Result<Endpoint, Invalid>,
    /// A duration such as `"2s"`.
    pub duration: &'a dyn Fn(&Item) -> Result<Duration, Invalid>,
}

/// One problem in a value: `at` the key path below it (`""`, `"[1]"`, `"[1].weight"`,
/// `".interval"`) and, when the document kept it, its own place in the file.
#[derive(Debug, PartialEq, Eq)]
pub struct Problem {
    pub at: String,
    pub span: Option<Range<usize>>,
    pub message: String,
}

fn problem(
    at: impl Into<String>,
    span: Option<Range<usize>>,
    message: impl Into<String>,
) -> Problem {
    Problem {
        at: at.into(),
        span,
        message: message.into(),
    }
}

/// What a value is, for messages: `a boolean (true)`, `an array`.
fn describe(item: &Item) -> String {
    let (article, kind) = match item {
        Item::None => ("", "nothing"),
        Item::Table(_) | Item::Value(Value::InlineTable(_)) => ("a ", "table"),
        Item::ArrayOfTables(_) | Item::Value(Value::Array(_)) => ("an ", "array"),
        Item::Value(Value::String(_)) => ("a ", "string"),
        Item::Value(Value::Integer(_)) => ("an ", "integer"),
        Item::Value(Value::Float(_)) => ("a ", "float"),
        Item::Value(Value::Boolean(_)) => ("a ", "boolean"),
        Item::Value(Value::Datetime(_)) => ("a ", "datetime"),
    };
    match item {
        Item::Value(v @ (Value::Integer(_) | Value::Float(_) | Value::Boolean(_))) => {
            format!("{article}{kind} ({})", v.to_string().trim())
        }
        _ => format!("{article}{kind}"),
    }
}

const UPSTREAM_FORMS: &str = "write upstream = \"10.0.0.2:80\", a list of addresses, or a list \
                              of tables such as { address = \"10.0.0.2:80\", weight = 2 }";

/// One element of `upstream`: an address or a table, with its place.
enum Element<'a> {
    Address(&'a str),
    Table(&'a dyn TableLike),
    Other(String),
}

fn element(value: &Value) -> Element<'_> {
    match value {
        Value::String(s) => Element::Address(s.value()),
        Value::InlineTable(t) => Element::Table(t),
        other => Element::Other(describe(&Item::Value(other.clone()))),
    }
}

/// `upstream`: a string, or a non-empty list of strings and `{address, weight, backup}` tables.
/// Every problem is reported; at least one server must be a primary.
pub fn servers(item: &Item, grammar: &Grammar<'_>) -> Result<Vec<ServerSpec>, Vec<Problem>> {
    let items: Vec<(Element<'_>, Option<Range<usize>>)> = match item {
        Item::Value(v @ Value::String(_)) => vec![(element(v), item.span())],
        Item::Value(Value::Array(a)) => a.iter().map(|v| (element(v), v.span())).collect(),
        Item::ArrayOfTables(a) => a.iter().map(|t| (Element::Table(t), t.span())).collect(),
        other => {
            let found = describe(other);
            let m = format!("expected an address or a list, found {found}; {UPSTREAM_FORMS}");
            return Err(vec![problem("", None, m)]);
        }
    };
    if items.is_empty() {
        let m = format!("the list is empty; {UPSTREAM_FORMS}");
        return Err(vec![problem("", None, m)]);
    }
    let listed = !matches!(item, Item::Value(Value::String(_)));
    let mut out: Vec<ServerSpec> = Vec::new();
    let mut problems = Vec::new();
    for (i, (el, span)) in items.into_iter().enumerate() {
        let at = if listed {
            format!("[{i}]")
        } else {
            String::new()
        };
        match server(el, &at, span.clone(), grammar) {
            Ok(s) => {
                if let Some(j) = out.iter().position(|o| o.address == s.address) {
                    let m = format!(
                        "\"{}\" is already upstream[{j}]; list each server once (use weight to \
                         give it a larger share)",
                        s.address
                    );
                    problems.push(problem(&at, span, m));
                }
                out.push(s);
            }
            Err(mut p) => problems.append(&mut p),
        }
    }
    if problems.is_empty() && out.iter().all(|s| s.backup) {
        problems.push(problem(
            "",
            None,
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
fn server(
    el: Element<'_>,
    at: &str,
    span: Option<Range<usize>>,
    grammar: &Grammar<'_>,
) -> Result<ServerSpec, Vec<Problem>> {
    let table = match el {
        Element::Address(s) => {
            return (grammar.address)(s)
                .map(ServerSpec::new)
                .map_err(|m| vec![problem(at, span, m)]);
        }
        Element::Table(t) => t,
        Element::Other(found) => {
            let m = format!(
                "expected an address or a table, found {found}; write \"10.0.0.2:80\" or \
                 {{ address = \"10.0.0.2:80\", weight = 2 }}"
            );
            return Err(vec![problem(at, span, m)]);
        }
    };
    let mut problems = Vec::new();
    let mut spec = ServerSpec::new(Endpoint {
        host: crate::addr::Host::Ip(std::net::Ipv4Addr::UNSPECIFIED.into()),
        zone: None,
        port: 0,
    });
    for (key, value) in table.iter() {
        let result = match key {
            "address" => match value.as_str() {
                Some(s) => (grammar.address)(s).map(|e| spec.address = e),
                None => Err(problem!(
                    "expected a string, found {}; write e.g. address = \"10.0.0.2:80\"",
                    describe(value)
                )),
            },
            "weight" => weight(value).map(|w| spec.weight = w),
            "backup" => match value.as_bool() {
                Some(b) => {
                    spec.backup = b;
                    Ok(())
                }
                None => Err(problem!(
                    "expected true or false, found {}; write e.g. backup = true",
                    describe(value)
                )),
            },
            _ => Err(
                "unknown key; valid keys of an upstream table are `address`, `weight`, \
                      `backup`"
                    .to_owned()
                    .into(),
            ),
        };
        if let Err(m) = result {
            let place = match key {
                "address" | "weight" | "backup" => value.span(),
                _ => table.get_key_value(key).and_then(|(k, _)| k.span()),
            };
            problems.push(problem(format!("{at}.{key}"), place.or(span.clone()), m));
        }
    }
    if !table.contains_key("address") {
        let m = "the table has no address; add e.g. address = \"10.0.0.2:80\"";
        problems.push(problem(at, span, m));
    }
    if problems.is_empty() {
        Ok(spec)
    } else {
        Err(problems)
    }
}

fn weight(item: &Item) -> Result<u32, Invalid> {
    match item.as_integer() {
        Some(n) if (1..=i64::from(MAX_WEIGHT)).contains(&n) => Ok(n as u32),
        Some(n) => Err(problem!(
            "{n} is out of range; use 1 to {MAX_WEIGHT} (a share relative to the other servers)"
        )),
        None => Err(problem!(
            "expected an integer, found {}; write e.g. weight = 2",
            describe(item)
        )),
    }
}

/// `balance`.
pub fn balance(item: &Item) -> Result<Balance, Invalid> {
    let valid = Balance::ALL.map(Balance::as_str).join(", ");
    let Some(s) = item.as_str() else {
        return Err(problem!(
            "expected a string, found {}; use one of {valid}",
            describe(item)
        ));
    };
    Balance::ALL
        .into_iter()
        .find(|b| b.as_str() == s)
        .ok_or_else(|| problem!("{s:?} is not a balance; use one of {valid}"))
}

/// The longest check `interval` (and `timeout`).
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// The shortest check `interval`: more often only loads the servers.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// `health_check = { interval, timeout, rise, fall }`, each optional (defaults: 2s, 1s, 2, 3);
/// the timeout may not exceed the interval.
pub fn health_check(item: &Item, grammar: &Grammar<'_>) -> Result<HealthCheck, Vec<Problem>> {
    let Some(table) = item.as_table_like() else {
        let m = format!(
            "expected a table, found {}; write e.g. health_check = {{ interval = \"2s\", \
             timeout = \"1s\", rise = 2, fall = 3 }}",
            describe(item)
        );
        return Err(vec![problem("", None, m)]);
    };
    let mut hc = HealthCheck::default();
    let mut problems = Vec::new();
    for (key, value) in table.iter() {
        let result = match key {
            "interval" => interval(value, grammar, "interval", "2s").map(|d| hc.interval = d),
            "timeout" => interval(value, grammar, "timeout", "1s").map(|d| hc.timeout = d),
            "rise" => count(value, "rise", 2).map(|n| hc.rise = n),
            "fall" => count(value, "fall", 3).map(|n| hc.fall = n),
            _ => Err(
                "unknown key; valid keys of health_check are `interval`, `timeout`, \
                      `rise`, `fall`"
                    .to_owned()
                    .into(),
            ),
        };
        if let Err(m) = result {
            let place = match key {
                "interval" | "timeout" | "rise" | "fall" => value.span(),
                _ => table.get_key_value(key).and_then(|(k, _)| k.span()),
            };
            problems.push(problem(format!(".{key}"), place, m));
        }
    }
    if problems.is_empty() && hc.timeout > hc.interval {
        let key = if table.contains_key("timeout") {
            "timeout"
        } else {
            "interval"
        };
        let m = format!(
            "the timeout ({:?}) is longer than the interval ({:?}); a check must end before the \
             next one starts: lower timeout or raise interval",
            hc.timeout, hc.interval
        );
        let place = table.get(key).and_then(Item::span);
        problems.push(problem(format!(".{key}"), place, m));
    }
    if problems.is_empty() {
        Ok(hc)
    } else {
        Err(problems)
    }
}

fn interval(
    item: &Item,
    grammar: &Grammar<'_>,
    key: &str,
    example: &str,
) -> Result<Duration, Invalid> {
    let d = (grammar.duration)(item)?;
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&d) {
        return Err(problem!(
            "{} is out of range; use 100ms to 1h, e.g. {key} = \"{example}\"",
            item.to_string().trim()
        ));
    }
    Ok(d)
}

fn count(item: &Item, key: &str, example: u32) -> Result<u32, Invalid> {
    match item.as_integer() {
        Some(n) if (1..=i64::from(MAX_RISE_FALL)).contains(&n) => Ok(n as u32),
        Some(n) => Err(problem!(
            "{n} is out of range; use 1 to {MAX_RISE_FALL}, e.g. {key} = {example}"
        )),
        None => Err(problem!(
            "expected an integer, found {}; write e.g. {key} = {example}",
            describe(item)
        )),
    }
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod tests;
