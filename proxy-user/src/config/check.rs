//! The checks: every key of the file, every route, and what routes must not share.
use toml_edit::{Item, TableLike, Value};

use super::{
    document::{entries, kind, Entry, Errors, Span},
    route_match, upstream,
    value::{self, format_size, unknown_key, Problem},
    Config, Mode, Route, DEFAULT_MAX_BUFFERED,
};
use crate::{
    addr::{self, Endpoint, Host},
    xdp::{self, config::ListError},
};

pub(super) const TOP_KEYS: [&str; 14] = [
    "mode",
    "grace_period",
    "send_buffer",
    "max_connections",
    "max_buffered",
    "max_buffered_total",
    "control_socket",
    "metrics",
    "user",
    "xdp",
    "xdp_mode",
    "workers",
    "pin_lanes",
    "route",
];
const ROUTE_KEYS: [&str; 18] = [
    "name",
    "listen",
    "upstream",
    "balance",
    "health_check",
    "mode",
    "interface",
    "connect_timeout",
    "max_buffered",
    "max_connections",
    "idle_timeout",
    "allow",
    "deny",
    "syn_rate",
    "peek_timeout",
    "proxy_protocol",
    "accept_proxy",
    "match",
];

const NO_ROUTES: &str =
    "no routes; add at least one [[route]] table with name, listen and upstream";

/// The top-level defaults routes inherit.
#[derive(Clone, Copy)]
struct Defaults {
    mode: Mode,
    max_buffered: u64,
}

/// Checks every key, recording each problem in `errors`; the result is only valid if none were
/// recorded.
pub(super) fn check(root: &dyn TableLike, errors: &mut Errors) -> Config {
    let mut config = Config::new(Vec::new());
    let mut defaults = Defaults {
        mode: Mode::Auto,
        max_buffered: DEFAULT_MAX_BUFFERED,
    };
    let top = entries(root);
    let mut total_span = None;
    for entry in top.iter().filter(|e| e.key != "route") {
        if entry.key == "xdp" {
            let names = list(entry, "xdp", errors, xdp::config::parse_interfaces);
            config.xdp = names.map_or_else(Vec::new, |n| xdp_interfaces(entry, n, errors));
            continue;
        }
        let result = top_key(entry, &mut config, &mut defaults);
        if entry.key == "max_buffered_total" && result.is_ok() {
            total_span = Some(entry.value_span());
        }
        report(errors, entry, &TOP_KEYS, entry.key, result);
    }
    match top.iter().find(|e| e.key == "route") {
        None => errors.add(Some(0), "route", NO_ROUTES),
        Some(routes) => check_routes(routes, defaults, &mut config, errors),
    }
    check_total(&config, &top, total_span, errors);
    config
}

/// Records a key's problem: at its value when the key is a known one, else at the key.
fn report(errors: &mut Errors, entry: &Entry, known: &[&str], key: &str, r: Result<(), Problem>) {
    if let Err(Problem(message)) = r {
        let span = if known.contains(&entry.key) {
            entry.value_span()
        } else {
            entry.key_span.clone()
        };
        errors.at(&span, key, message);
    }
}

/// One top-level key other than `route`.
fn top_key(entry: &Entry, config: &mut Config, defaults: &mut Defaults) -> Result<(), Problem> {
    let item = entry.item;
    match entry.key {
        "mode" => defaults.mode = value::mode(item)?,
        "grace_period" => config.grace_period = value::duration(item)?,
        "send_buffer" => config.send_buffer = value::send_buffer(item)?,
        "max_connections" => config.max_connections = value::max_connections(item)?,
        "max_buffered" => defaults.max_buffered = value::max_buffered(item)?,
        "max_buffered_total" => config.max_buffered_total = value::max_buffered_total(item)?,
        "control_socket" => config.control_socket = value::control_socket(item)?,
        "xdp_mode" => config.xdp_mode = value::xdp_mode(item)?,
        "workers" => config.workers = Some(value::workers(item)?),
        "pin_lanes" => config.pin_lanes = value::boolean(item, "pin_lanes = false")?,
        "metrics" => config.metrics = Some(value::metrics(item)?),
        "user" => config.user = Some(value::user(item)?),
        key => return Err(unknown_key(key, &TOP_KEYS, "top-level")),
    }
    Ok(())
}

/// The `route` key: `[[route]]` tables, or an array of inline tables.
fn check_routes(routes: &Entry, defaults: Defaults, config: &mut Config, errors: &mut Errors) {
    let span = routes.value_span();
    let tables: Vec<(Result<&dyn TableLike, &'static str>, Span)> = match routes.item {
        Item::ArrayOfTables(list) => list
            .iter()
            .map(|t| (Ok(t as &dyn TableLike), t.span().unwrap_or(span.clone())))
            .collect(),
        Item::Value(Value::Array(list)) => list
            .iter()
            .map(|v| {
                let table = match v {
                    Value::InlineTable(t) => Ok(t as &dyn TableLike),
                    other => Err(kind(&Item::Value(other.clone()))),
                };
                (table, v.span().unwrap_or(span.clone()))
            })
            .collect(),
        Item::Table(_) | Item::Value(Value::InlineTable(_)) => {
            let message =
                "[route] is a single table; write [[route]] (two brackets) before each route";
            return errors.at(&span, "route", message);
        }
        other => {
            let message = format!(
                "expected [[route]] tables, found {}; write each route as a [[route]] table \
                 with name, listen and upstream",
                kind(other)
            );
            return errors.at(&span, "route", message);
        }
    };
    if tables.is_empty() {
        return errors.at(&span, "route", NO_ROUTES);
    }
    let mut seen: Vec<Checked> = Vec::new();
    for (i, (table, table_span)) in tables.into_iter().enumerate() {
        let mut checked = match table {
            Ok(table) => check_route(i, table, &table_span, defaults, errors),
            Err(kind) => {
                let message = format!(
                    "expected a table, found {kind}; write each route as a [[route]] table"
                );
                errors.at(&table_span, &format!("route[{i}]"), message);
                continue;
            }
        };
        check_unique(&checked, &seen, errors);
        config.routes.extend(checked.route.take());
        seen.push(checked);
    }
}

/// `max_buffered_total` must hold at least one connection of every route.
fn check_total(config: &Config, top: &[Entry], total_span: Option<Span>, errors: &mut Errors) {
    let Some(largest) = config.routes.iter().map(|r| r.max_buffered).max() else {
        return;
    };
    if largest <= config.max_buffered_total {
        return;
    }
    let message = format!(
        "{} is less than the largest max_buffered ({}); raise max_buffered_total to at least {} \
         or lower max_buffered",
        format_size(config.max_buffered_total),
        format_size(largest),
        format_size(largest)
    );
    match total_span {
        Some(span) => errors.at(&span, "max_buffered_total", message),
        // The default total: point at the max_buffered that is too large.
        None => match top.iter().find(|e| e.key == "max_buffered") {
            Some(e) => errors.at(&e.value_span(), "max_buffered", message),
            None => errors.add(Some(0), "max_buffered_total", message),
        },
    }
}

/// What was understood of one `[[route]]`: the name and listen address on their own, so that
/// uniqueness is checked even when another key of the route is wrong.
struct Checked {
    index: usize,
    name: Option<(String, Span)>,
    listen: Option<(Endpoint, Span)>,
    /// The whole route, if every key was valid.
    route: Option<Route>,
}

fn check_route(
    index: usize,
    table: &dyn TableLike,
    table_span: &Span,
    defaults: Defaults,
    errors: &mut Errors,
) -> Checked {
    let mut checked = Checked {
        index,
        name: None,
        listen: None,
        route: None,
    };
    let key_of = |field: &str| format!("route[{index}].{field}");
    // Name, listen and upstream are set below or the route is not kept.
    let unset = Endpoint {
        host: Host::Ip(std::net::Ipv4Addr::UNSPECIFIED.into()),
        zone: None,
        port: 0,
    };
    let mut route = Route::new("", unset.clone(), unset);
    route.mode = defaults.mode;
    route.max_buffered = defaults.max_buffered;
    let mut ok = true;
    // Without an `upstream` key (a route with matches only) the route has no servers.
    route.upstream.servers.clear();
    for entry in entries(table) {
        if let Some(fine) = upstream::key(&entry, &mut route.upstream, &key_of(entry.key), errors) {
            ok &= fine;
            continue;
        }
        if let Some(fine) = prefix_key(&entry, &mut route, &key_of(entry.key), errors) {
            ok &= fine;
            continue;
        }
        if entry.key == "match" {
            match route_match::check_matches(index, &entry, errors) {
                Some(matches) => route.matches = matches,
                None => ok = false,
            }
            continue;
        }
        let result = route_key(&entry, &mut route, &mut checked);
        ok &= result.is_ok();
        report(errors, &entry, &ROUTE_KEYS, &key_of(entry.key), result);
    }
    // With matches, `upstream` is only the default for connections no match takes.
    let upstream_needed = !table.contains_key("match");
    for (field, example) in [
        ("name", "name = \"web\""),
        ("listen", "listen = \"127.0.0.1:8080\""),
        ("upstream", "upstream = \"10.0.0.2:80\""),
    ] {
        if field == "upstream" && !upstream_needed {
            continue;
        }
        if !table.contains_key(field) {
            ok = false;
            errors.at(
                table_span,
                &key_of(field),
                format!("missing (required); add e.g. {example} to this [[route]]"),
            );
        }
    }
    if let (true, Some((name, _)), Some((listen, _))) = (ok, &checked.name, &checked.listen) {
        route.name = name.clone();
        route.listen = listen.clone();
        checked.route = Some(route);
    }
    checked
}

/// `allow`, `deny` or `accept_proxy`: a list of prefixes. `None` for other keys; else whether
/// the list was valid.
fn prefix_key(entry: &Entry, route: &mut Route, key: &str, errors: &mut Errors) -> Option<bool> {
    let parse = |texts: &[&str]| match entry.key {
        "accept_proxy" => accept_proxy(texts),
        key => xdp::config::parse_prefixes(texts, key),
    };
    let prefixes = match entry.key {
        "allow" | "deny" | "accept_proxy" => list(entry, key, errors, parse),
        _ => return None,
    };
    let Some(p) = prefixes else {
        return Some(false);
    };
    match entry.key {
        "allow" => route.rules.allow = Some(p),
        "deny" => route.rules.deny = p,
        _ => route.accept_proxy = p,
    }
    Some(true)
}

/// One key of a `[[route]]` table.
fn route_key(entry: &Entry, route: &mut Route, checked: &mut Checked) -> Result<(), Problem> {
    let item = entry.item;
    let span = entry.value_span();
    match entry.key {
        "name" => checked.name = Some((value::route_name(item)?, span)),
        "listen" => checked.listen = Some((value::listen(item)?, span)),
        "peek_timeout" => route.peek_timeout = route_match::peek_timeout(item)?,
        "proxy_protocol" => route.proxy_protocol = Some(route_match::proxy_protocol(item)?),
        "mode" => route.mode = value::mode(item)?,
        "interface" => route.interface = Some(value::interface(item)?),
        "connect_timeout" => route.connect_timeout = value::connect_timeout(item)?,
        "max_buffered" => route.max_buffered = value::max_buffered(item)?,
        "max_connections" => route.max_connections = Some(value::max_connections(item)?),
        "idle_timeout" => route.idle_timeout = Some(value::idle_timeout(item)?),
        "syn_rate" => route.rules.syn_rate = Some(value::syn_rate(item)?),
        key => return Err(unknown_key(key, &ROUTE_KEYS, "[[route]]")),
    }
    Ok(())
}

/// `accept_proxy`: the prefixes of the front proxies that must send a PROXY header. Empty would
/// trust no one, which is what leaving the key out says.
fn accept_proxy(texts: &[&str]) -> Result<Vec<xdp::Prefix>, ListError> {
    if texts.is_empty() {
        return Err(ListError {
            index: None,
            message: "an empty list trusts no source; remove `accept_proxy`, or list the \
                      prefixes of the front proxies that send PROXY headers"
                .to_owned(),
        });
    }
    xdp::config::parse_prefixes(texts, "accept_proxy")
}

/// `xdp`, `allow`, `deny`, `accept_proxy`: a list of strings checked by `parse`; a problem is recorded at the
/// element at fault (or at the list). `None` when there was one.
fn list<T>(
    entry: &Entry,
    key: &str,
    errors: &mut Errors,
    parse: impl FnOnce(&[&str]) -> Result<T, ListError>,
) -> Option<T> {
    let whole = entry.value_span();
    let Some(array) = entry.item.as_array() else {
        let found = kind(entry.item);
        errors.at(
            &whole,
            key,
            format!("expected a list of strings, found {found}"),
        );
        return None;
    };
    let mut texts = Vec::new();
    let mut spans = Vec::new();
    for v in array.iter() {
        let span = v.span().unwrap_or_else(|| whole.clone());
        let Some(text) = v.as_str() else {
            let found = kind(&Item::Value(v.clone()));
            errors.at(&span, key, format!("expected a string, found {found}"));
            return None;
        };
        texts.push(text);
        spans.push(span);
    }
    parse(&texts)
        .map_err(|e| {
            let span = e.index.and_then(|i| spans.get(i)).unwrap_or(&whole);
            errors.at(span, key, e.message);
        })
        .ok()
}

/// The `xdp` names that exist here; each missing one is recorded at its element.
fn xdp_interfaces(entry: &Entry, names: Vec<String>, errors: &mut Errors) -> Vec<String> {
    let spans: Vec<Span> = entry
        .item
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.span()).collect())
        .unwrap_or_default();
    for (i, name) in names.iter().enumerate() {
        if !addr::interface_exists(name) {
            let span = spans.get(i).cloned().unwrap_or_else(|| entry.value_span());
            errors.at(
                &span,
                "xdp",
                format!(
                    "interface {name:?} does not exist on this machine; fix the name or create \
                     the interface first (ip link shows the interfaces)"
                ),
            );
        }
    }
    names
}

/// Reports a route whose name or listen address an earlier route already has.
fn check_unique(route: &Checked, earlier: &[Checked], errors: &mut Errors) {
    let i = route.index;
    if let Some((name, span)) = &route.name {
        let same = earlier
            .iter()
            .find(|e| e.name.as_ref().is_some_and(|(n, _)| n == name));
        if let Some(e) = same {
            errors.at(
                span,
                &format!("route[{i}].name"),
                format!(
                    "{name:?} is already the name of route[{}]; route names must be unique",
                    e.index
                ),
            );
        }
    }
    let Some((listen, span)) = &route.listen else {
        return;
    };
    for e in earlier {
        let Some((other, _)) = &e.listen else {
            continue;
        };
        let Some(how) = listen_conflict(listen, other) else {
            continue;
        };
        let owner = match &e.name {
            Some((n, _)) => format!("route[{}] ({n:?})", e.index),
            None => format!("route[{}]", e.index),
        };
        let message = match how {
            Conflict::Same => format!(
                "{listen} is already the listen address of {owner}; give each route its own \
                 address or port"
            ),
            Conflict::Wildcard => format!(
                "{listen} overlaps {other} of {owner}: a wildcard address (0.0.0.0 or [::]) \
                 takes the port on every address; give each route its own port"
            ),
        };
        errors.at(span, &format!("route[{i}].listen"), message);
        break;
    }
}

pub(super) enum Conflict {
    Same,
    Wildcard,
}

/// Whether two listen addresses cannot both be bound. Port 0 picks a fresh port each time, so
/// it never conflicts. `[::]` also takes IPv4 addresses: the daemon leaves IPV6_V6ONLY at the
/// kernel's default (`net.ipv6.bindv6only = 0`).
pub(super) fn listen_conflict(a: &Endpoint, b: &Endpoint) -> Option<Conflict> {
    if a.port != b.port || a.port == 0 {
        return None;
    }
    if a == b {
        return Some(Conflict::Same);
    }
    let (Host::Ip(x), Host::Ip(y)) = (&a.host, &b.host) else {
        return None;
    };
    let covers = |wild: &std::net::IpAddr, other: &std::net::IpAddr| {
        wild.is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
    };
    (covers(x, y) || covers(y, x)).then_some(Conflict::Wildcard)
}
