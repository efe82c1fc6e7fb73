//! `[[route.match]]` tables and `peek_timeout`: what a route's matches ask of the first bytes
//! and where their connections go.
use std::time::Duration;

use toml_edit::{Item, TableLike, Value};

use super::{
    document::{entries, kind, Entry, Errors, Span},
    value::{self, unknown_key, Problem},
    Mode,
};
use crate::{
    peek::{Match, NamePattern, Protocol},
    proxy_header,
    upstream::{Balance, UpstreamSpec},
};

pub(super) const MATCH_KEYS: [&str; 11] = [
    "sni",
    "alpn",
    "host",
    "protocol",
    "upstream",
    "balance",
    "health_check",
    "mode",
    "connect_timeout",
    "interface",
    "proxy_protocol",
];

/// The default `peek_timeout`.
pub const DEFAULT_PEEK_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest `peek_timeout`: a client that has not said who it wants in a minute is not coming.
pub const MAX_PEEK_TIMEOUT: Duration = Duration::from_secs(60);

/// One `[[route.match]]`: its conditions and where its connections go; unset keys are the
/// route's.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteMatch {
    pub rule: Match,
    pub upstream: UpstreamSpec,
    pub mode: Option<Mode>,
    pub connect_timeout: Option<Duration>,
    pub interface: Option<String>,
    pub proxy_protocol: Option<proxy_header::Version>,
}

pub(super) fn peek_timeout(item: &Item) -> Result<Duration, Problem> {
    let d = value::duration(item)?;
    if d.is_zero() || d > MAX_PEEK_TIMEOUT {
        return Err(Problem(format!(
            "{d:?} is out of range; use more than 0 and at most 60s, e.g. \"5s\""
        )));
    }
    Ok(d)
}

pub(super) fn proxy_protocol(item: &Item) -> Result<proxy_header::Version, Problem> {
    let s = item.as_str().ok_or_else(|| {
        Problem(format!(
            "expected a string, found {}; write proxy_protocol = \"v2\"",
            kind(item)
        ))
    })?;
    proxy_header::Version::parse(s).ok_or_else(|| {
        Problem(format!(
            "{s:?} is not a PROXY protocol version; use \"v1\" or \"v2\""
        ))
    })
}

/// The `match` key of route `index`: each table checked, problems recorded at the element.
pub(super) fn check_matches(
    index: usize,
    entry: &Entry,
    errors: &mut Errors,
) -> Option<Vec<RouteMatch>> {
    let span = entry.value_span();
    let tables: Vec<(&dyn TableLike, Span)> = match entry.item {
        Item::ArrayOfTables(list) => list
            .iter()
            .map(|t| (t as &dyn TableLike, t.span().unwrap_or(span.clone())))
            .collect(),
        Item::Value(Value::Array(list)) if list.iter().all(|v| v.is_inline_table()) => list
            .iter()
            .filter_map(|v| {
                Some((
                    v.as_inline_table()? as &dyn TableLike,
                    v.span().unwrap_or(span.clone()),
                ))
            })
            .collect(),
        other => {
            let message = format!(
                "expected [[route.match]] tables, found {}; write each match as a [[route.match]] \
                 table after its [[route]]",
                kind(other)
            );
            errors.at(&span, &format!("route[{index}].match"), message);
            return None;
        }
    };
    let mut matches = Vec::new();
    let mut ok = true;
    for (m, (table, table_span)) in tables.into_iter().enumerate() {
        match check_match(
            &format!("route[{index}].match[{m}]"),
            table,
            &table_span,
            errors,
        ) {
            Some(one) => matches.push(one),
            None => ok = false,
        }
    }
    ok.then_some(matches)
}

fn check_match(
    key: &str,
    table: &dyn TableLike,
    span: &Span,
    errors: &mut Errors,
) -> Option<RouteMatch> {
    let mut rule = Match::default();
    let mut upstream = UpstreamSpec {
        servers: Vec::new(),
        balance: Balance::RoundRobin,
        health_check: None,
    };
    let mut out = Keys::default();
    let mut ok = true;
    for entry in entries(table) {
        let name = format!("{key}.{}", entry.key);
        if let Some(fine) = super::upstream::key(&entry, &mut upstream, &name, errors) {
            ok &= fine;
            continue;
        }
        let result = match_key(&entry, &mut rule, &mut out);
        if let Err((Problem(message), at)) = result {
            ok = false;
            errors.at(&at, &format!("{key}.{}", entry.key), message);
        }
    }
    if ok && rule.is_empty() {
        ok = false;
        errors.at(
            span,
            key,
            "a match needs at least one of sni, alpn, host, protocol; without \
                   any it would take every connection (set the route's upstream for that)",
        );
    }
    if let Some(why) = rule.contradiction() {
        ok = false;
        errors.at(span, key, format!("{why}; split it into two matches"));
    }
    if !table.contains_key("upstream") {
        errors.at(
            span,
            &format!("{key}.upstream"),
            "missing (required); add e.g. upstream = \"10.0.0.2:443\" to this [[route.match]]",
        );
        return None;
    }
    ok.then_some(RouteMatch {
        rule,
        upstream,
        mode: out.mode,
        connect_timeout: out.connect_timeout,
        interface: out.interface,
        proxy_protocol: out.proxy_protocol,
    })
}

/// One key of a match other than the upstream ones; a problem comes with its place.
fn match_key(entry: &Entry, rule: &mut Match, out: &mut Keys) -> Result<(), (Problem, Span)> {
    let at = entry.value_span();
    let plain = |r: Result<(), Problem>| r.map_err(|p| (p, at.clone()));
    let item = entry.item;
    match entry.key {
        "sni" => rule.sni = names(item, &at)?,
        "host" => rule.host = names(item, &at)?,
        "alpn" => rule.alpn = strings(item, &at, "alpn = [\"h2\", \"http/1.1\"]")?,
        "protocol" => plain(protocol(item).map(|p| rule.protocol = Some(p)))?,
        "mode" => plain(value::mode(item).map(|v| out.mode = Some(v)))?,
        "connect_timeout" => {
            plain(value::connect_timeout(item).map(|v| out.connect_timeout = Some(v)))?
        }
        "interface" => plain(value::interface(item).map(|v| out.interface = Some(v)))?,
        "proxy_protocol" => plain(proxy_protocol(item).map(|v| out.proxy_protocol = Some(v)))?,
        other => {
            let problem = unknown_key(other, &MATCH_KEYS, "[[route.match]]");
            return Err((problem, entry.key_span.clone()));
        }
    }
    Ok(())
}

/// The keys a match may set like a route.
#[derive(Default)]
struct Keys {
    mode: Option<Mode>,
    connect_timeout: Option<Duration>,
    interface: Option<String>,
    proxy_protocol: Option<proxy_header::Version>,
}

/// A list of strings, each element's problem at the element.
fn strings(item: &Item, at: &Span, example: &str) -> Result<Vec<String>, (Problem, Span)> {
    let Some(list) = item.as_array() else {
        return Err((
            Problem(format!(
                "expected a list of strings, found {}; write e.g. {example}",
                kind(item)
            )),
            at.clone(),
        ));
    };
    if list.is_empty() {
        return Err((
            Problem(format!(
                "the list is empty; write e.g. {example}, or leave the key out"
            )),
            at.clone(),
        ));
    }
    list.iter()
        .map(|v| {
            let here = v.span().unwrap_or(at.clone());
            v.as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| {
                    (
                        Problem(format!("expected a non-empty string; write e.g. {example}")),
                        here,
                    )
                })
        })
        .collect()
}

fn names(item: &Item, at: &Span) -> Result<Vec<NamePattern>, (Problem, Span)> {
    let example = "[\"blog.example.com\", \"*.example.org\"]";
    let Some(list) = item.as_array() else {
        return Err((
            Problem(format!(
                "expected a list of names, found {}; write e.g. {example}",
                kind(item)
            )),
            at.clone(),
        ));
    };
    list.iter()
        .map(|v| {
            let here = v.span().unwrap_or(at.clone());
            let text = v.as_str().ok_or_else(|| {
                (
                    Problem(format!("expected a name as a string; write e.g. {example}")),
                    here.clone(),
                )
            })?;
            NamePattern::parse(text).map_err(|e| (Problem(format!("{text:?}: {e}")), here))
        })
        .collect()
}

fn protocol(item: &Item) -> Result<Protocol, Problem> {
    let s = item.as_str().ok_or_else(|| {
        Problem(format!(
            "expected a string, found {}; write protocol = \"tls\"",
            kind(item)
        ))
    })?;
    Protocol::parse(s).ok_or_else(|| {
        Problem(format!(
            "{s:?} is not a protocol; use \"tls\", \"http\" or \"other\""
        ))
    })
}

#[cfg(test)]
#[path = "route_match_tests.rs"]
mod tests;
