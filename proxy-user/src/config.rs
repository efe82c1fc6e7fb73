//! Configuration: the TOML file, its defaults, and its validation.
//!
//! # File format
//!
//! ```toml
//! # all top-level keys optional
//! mode = "auto"            # auto | sockmap | splice | copy: default for routes
//! grace_period = "30s"     # how long live connections may run after SIGINT/SIGTERM
//! send_buffer = "16MiB"    # SO_SNDBUF of the proxy's sockets; "0" leaves kernel autotuning
//! max_connections = 10000  # live connections across all routes
//! max_buffered = "16MiB"   # default for routes: bytes held in the kernel per direction
//! max_buffered_total = "512MiB"  # all connections together (sockmap backpressure)
//! control_socket = "/run/spliced/control.sock"  # `spliced status` asks here (root only)
//! metrics = "127.0.0.1:9180"  # Prometheus text on http://ADDR/metrics; off when absent
//! user = "spliced"         # after start-up, run as this user (see crate::privdrop)
//!
//! [[route]]
//! name = "ghost"                                   # required, unique, [A-Za-z0-9_.-]+
//! listen = "127.0.0.1:8080"                        # required: an IP literal and a port
//! upstream = "[fe80::216:3eff:fe12:3456%lxdbr0]:2368"  # required: IP literal or host name
//! mode = "sockmap"                                 # optional, overrides top-level mode
//! interface = "lxdbr0"                             # optional: SO_BINDTODEVICE for the dial
//! connect_timeout = "5s"                           # optional, default 5s
//! max_buffered = "16MiB"                           # optional, overrides the top-level one
//! max_connections = 100                            # optional: live connections of this route
//! idle_timeout = "10m"                             # optional: close after this long without data
//! ```
//!
//! - Durations are a whole number and a unit: `"250ms"`, `"5s"`, `"2m"`, `"1h"`.
//!   `connect_timeout` must be more than 0 and at most 1h; `idle_timeout` more than 0 and at
//!   most 168h; `grace_period` may be `"0s"`.
//! - Sizes are a number of bytes (`4096` or `"4096"`) or a string with a binary unit:
//!   `"512KiB"`, `"16MiB"`, `"1GiB"`. `send_buffer` is at most 1GiB; 0 leaves the kernel's
//!   buffer autotuning on.
//! - Addresses are written as in [`crate::addr`]. A link-local IPv6 upstream needs its
//!   interface as a zone: `[fe80::1%lxdbr0]:2368`.
//! - Interfaces named in `interface` or in a zone must exist when the file is checked.
//!
//! Defaults: `mode = "auto"`, `grace_period = "30s"`, `send_buffer = "16MiB"`,
//! `max_connections = 10000`, `connect_timeout = "5s"`, `max_buffered = "16MiB"` (64KiB to
//! 1GiB), `max_buffered_total = "512MiB"` (at least every route's `max_buffered`, at most 64GiB).
//!
//! [`Config::from_toml`] reports every problem it finds, not just the first, each as
//! `FILE:LINE:COLUMN: KEY: what is wrong; what would be valid`, where KEY is a top-level key
//! (`grace_period`) or a route key (`route[1].upstream`, counting routes from 0).
use std::{fmt, ops::Range, path::Path, time::Duration};

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use toml::{Spanned, Value};

use crate::addr::{self, Endpoint, Host};

/// The exit status for a bad command line or configuration (sysexits.h `EX_USAGE`).
pub const EX_USAGE: i32 = 64;

/// The longest `connect_timeout`: a dial that takes longer is dead, and a client waiting that
/// long has gone.
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(3600);

/// The largest `send_buffer`. The kernel doubles the value and caps it at `net.core.wmem_max`
/// anyway; more than this is a typo.
pub const MAX_SEND_BUFFER: usize = 1 << 30;

/// The largest `max_connections`. Each connection holds at least two file descriptors, and
/// the kernel's `fs.nr_open` defaults to about a million; this only catches typos (and stays
/// far below tokio's semaphore limit).
pub const MAX_CONNECTIONS: usize = 100_000_000;

/// Default `max_buffered`: bytes one direction of a sockmap connection may have redirected
/// beyond what the peer has taken (sockmap.md, trap 8). 16 MiB, not 4: at 4 MiB a bulk upload
/// at line rate over veth held and handed back all the time (upload 7.9 against 9.5 Gbit/s
/// unbounded, interleaved iperf3 runs); at 16 MiB no throughput difference was measurable.
pub const DEFAULT_MAX_BUFFERED: u64 = 16 << 20;
/// Default `max_buffered_total`: the bound across all connections.
pub const DEFAULT_MAX_BUFFERED_TOTAL: u64 = 512 << 20;
/// Bounds of `max_buffered`: below 64 KiB a connection holds at every skb; above 1 GiB the bound
/// protects nothing.
pub const MIN_MAX_BUFFERED: u64 = 64 << 10;
pub const MAX_MAX_BUFFERED: u64 = 1 << 30;
/// The largest `max_buffered_total`.
pub const MAX_MAX_BUFFERED_TOTAL: u64 = 64 << 30;
/// The longest `idle_timeout`: a week. Longer is a typo; leave the key out for no timeout.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(168 * 3600);
/// Where the daemon answers `spliced status` unless `control_socket` says otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/spliced/control.sock";

/// Which data path carries a route's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// sockmap when the kernel supports it, splice otherwise.
    Auto,
    /// The eBPF sockmap redirect: bytes never reach userspace.
    Sockmap,
    /// splice(2) through a pipe.
    Splice,
    /// Plain read/write copies (the reference path).
    Copy,
}

impl Mode {
    /// Every mode, in the order the documentation lists them.
    pub const ALL: [Mode; 4] = [Mode::Auto, Mode::Sockmap, Mode::Splice, Mode::Copy];

    /// The name used in the configuration file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Sockmap => "sockmap",
            Mode::Splice => "splice",
            Mode::Copy => "copy",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One listener and where its connections go.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub name: String,
    pub listen: Endpoint,
    pub upstream: Endpoint,
    /// The effective mode: the route's own, or else the file's top-level one.
    pub mode: Mode,
    /// Bind the upstream dial to this interface (SO_BINDTODEVICE).
    pub interface: Option<String>,
    pub connect_timeout: Duration,
    /// Bytes one direction may have redirected beyond what the peer has taken (sockmap path).
    pub max_buffered: u64,
    /// Live connections of this route; more are refused at once. `None`: only the global bound.
    pub max_connections: Option<usize>,
    /// A connection that carried no data either way for this long is closed (both sides
    /// reset). `None`: never.
    pub idle_timeout: Option<Duration>,
}

/// The whole daemon configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub routes: Vec<Route>,
    /// How long live connections may run after SIGINT/SIGTERM before they are closed.
    pub grace_period: Duration,
    /// SO_SNDBUF for the proxy's sockets; `None` leaves the kernel's autotuning on.
    pub send_buffer: Option<usize>,
    /// Live connections across all routes; more are refused.
    pub max_connections: usize,
    /// Bound on `max_buffered` reservations across all connections.
    pub max_buffered_total: u64,
    /// The Unix socket `spliced status` connects to.
    pub control_socket: std::path::PathBuf,
    /// Where to serve Prometheus metrics; `None`: not served.
    pub metrics: Option<Endpoint>,
    /// The user to switch to once the program is loaded and the sockets are bound; `None`:
    /// stay as started.
    pub user: Option<String>,
}

/// One configuration error, already rendered with file:line:column, key and fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Route {
    /// A route with the default mode (auto), no interface and a 5 s connect timeout.
    pub fn new(name: impl Into<String>, listen: Endpoint, upstream: Endpoint) -> Self {
        Route {
            name: name.into(),
            listen,
            upstream,
            mode: Mode::Auto,
            interface: None,
            connect_timeout: Duration::from_secs(5),
            max_buffered: DEFAULT_MAX_BUFFERED,
            max_connections: None,
            idle_timeout: None,
        }
    }

    /// The same route with another mode.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
}

impl Config {
    /// A configuration with these routes and the defaults: a 30 s grace period, 16 MiB send
    /// buffers and at most 10000 connections.
    pub fn new(routes: Vec<Route>) -> Self {
        Config {
            routes,
            grace_period: Duration::from_secs(30),
            send_buffer: Some(16 << 20),
            max_connections: 10_000,
            max_buffered_total: DEFAULT_MAX_BUFFERED_TOTAL,
            control_socket: DEFAULT_CONTROL_SOCKET.into(),
            metrics: None,
            user: None,
        }
    }

    /// Parses and checks a configuration file's text; `path` only names the file in errors.
    ///
    /// Returns every error found (a TOML syntax error stops the parse and is the only one).
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, Vec<ConfigError>> {
        let mut errors = Errors::default();
        let config = match toml::from_str::<RawConfig>(text) {
            Ok(raw) => Some(check(raw, &mut errors)),
            Err(e) => {
                errors.syntax(e);
                None
            }
        };
        match config {
            Some(config) if errors.list.is_empty() => Ok(config),
            _ => Err(errors.render(path, text)),
        }
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::from_toml(path, &text),
            Err(e) => Err(vec![ConfigError(format!(
                "{}: cannot read the configuration file: {e}",
                path.display()
            ))]),
        }
    }
}

/// Checks that a zone given by name names an existing interface. Zones by index are checked
/// when the address is resolved.
pub(crate) fn check_zone(endpoint: &Endpoint) -> Result<(), String> {
    match endpoint.zone_name() {
        Some(name) if !addr::interface_exists(name) => Err(format!(
            "interface {name:?} (the zone of \"{endpoint}\") does not exist on this machine; \
             fix the name or create the interface first (ip link shows the interfaces)"
        )),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw file structure. Values stay `toml::Value` with their spans so that one wrong type does not
// stop the parse: each key is checked by hand and every problem is reported.

const TOP_KEYS: [&str; 10] = [
    "mode",
    "grace_period",
    "send_buffer",
    "max_connections",
    "max_buffered",
    "max_buffered_total",
    "control_socket",
    "metrics",
    "user",
    "route",
];
const ROUTE_KEYS: [&str; 9] = [
    "name",
    "listen",
    "upstream",
    "mode",
    "interface",
    "connect_timeout",
    "max_buffered",
    "max_connections",
    "idle_timeout",
];

#[derive(Default)]
struct RawConfig {
    /// Every top-level key but `route`, in file order.
    entries: Vec<(Spanned<String>, Spanned<Value>)>,
    routes: Option<Spanned<RawRoutes>>,
}

enum RawRoutes {
    List(Vec<Spanned<RawItem>>),
    /// `[route]` instead of `[[route]]`.
    Table,
    /// A string, number or boolean: its TOML type, with an article ("an integer").
    Scalar(&'static str),
}

enum RawItem {
    Table(Vec<(Spanned<String>, Spanned<Value>)>),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for RawConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of settings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawConfig, A::Error> {
                let mut raw = RawConfig::default();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    if key.get_ref() == "route" {
                        raw.routes = Some(map.next_value()?);
                    } else {
                        raw.entries.push((key, map.next_value()?));
                    }
                }
                Ok(raw)
            }
        }
        d.deserialize_map(V)
    }
}

/// Implements the scalar `visit_*` methods of a visitor that accepts any value, mapping each to
/// `$make(type name)`.
macro_rules! visit_scalars {
    ($make:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($make("a boolean"))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($make("an integer"))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($make("an integer"))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($make("a float"))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($make("a string"))
        }
    };
}

impl<'de> Deserialize<'de> for RawRoutes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawRoutes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("[[route]] tables")
            }
            visit_scalars!(RawRoutes::Scalar);
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawRoutes, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(RawRoutes::List(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawRoutes, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(RawRoutes::Table)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a [[route]] table")
            }
            visit_scalars!(RawItem::Other);
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawItem, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RawItem::Other("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawItem, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(RawItem::Table(entries))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors with positions.

struct Located {
    /// Byte offset in the file; `None` for problems of the whole file.
    at: Option<usize>,
    key: String,
    message: String,
}

#[derive(Default)]
struct Errors {
    list: Vec<Located>,
}

impl Errors {
    fn add(&mut self, at: Option<usize>, key: impl Into<String>, message: impl Into<String>) {
        self.list.push(Located {
            at,
            key: key.into(),
            message: message.into(),
        });
    }

    fn at(&mut self, span: &Range<usize>, key: &str, message: impl Into<String>) {
        self.add(Some(span.start), key, message);
    }

    fn syntax(&mut self, e: toml::de::Error) {
        let message = e.message().trim_end().replace('\n', "; ");
        self.add(
            e.span().map(|s| s.start),
            "",
            format!("invalid TOML: {message}"),
        );
    }

    /// Sorts by position (stable, so problems found at one place keep their order) and renders
    /// `FILE:LINE:COL: KEY: message`.
    fn render(mut self, path: &Path, text: &str) -> Vec<ConfigError> {
        self.list.sort_by_key(|e| e.at.unwrap_or(usize::MAX));
        let file = path.display();
        self.list
            .into_iter()
            .map(|e| {
                let key = if e.key.is_empty() {
                    String::new()
                } else {
                    format!("{}: ", e.key)
                };
                ConfigError(match e.at {
                    Some(at) => {
                        let (line, col) = line_column(text, at);
                        format!("{file}:{line}:{col}: {key}{}", e.message)
                    }
                    None => format!("{file}: {key}{}", e.message),
                })
            })
            .collect()
    }
}

/// The 1-based line and column (in characters) of byte offset `at`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

// ---------------------------------------------------------------------------------------------
// Checks.

/// Checks every key, recording each problem in `errors`; the result is only valid if none were
/// recorded.
fn check(raw: RawConfig, errors: &mut Errors) -> Config {
    let mut config = Config::new(Vec::new());
    let mut default_mode = Mode::Auto;
    let mut default_buffered = DEFAULT_MAX_BUFFERED;
    let mut total_span = None;
    for (key, value) in &raw.entries {
        let name = key.get_ref().as_str();
        let span = value.span();
        let result = match name {
            "mode" => parse_mode(value.get_ref()).map(|m| default_mode = m),
            "grace_period" => parse_duration(value.get_ref()).map(|d| config.grace_period = d),
            "send_buffer" => parse_send_buffer(value.get_ref()).map(|b| config.send_buffer = b),
            "max_connections" => {
                parse_max_connections(value.get_ref()).map(|n| config.max_connections = n)
            }
            "max_buffered" => parse_max_buffered(value.get_ref()).map(|b| default_buffered = b),
            "max_buffered_total" => parse_max_buffered_total(value.get_ref()).map(|b| {
                config.max_buffered_total = b;
                total_span = Some(span.clone());
            }),
            "control_socket" => {
                parse_control_socket(value.get_ref()).map(|p| config.control_socket = p)
            }
            "metrics" => parse_metrics(value.get_ref()).map(|e| config.metrics = Some(e)),
            "user" => parse_user(value.get_ref()).map(|u| config.user = Some(u)),
            _ => Err(unknown_key(name, &TOP_KEYS, "top-level")),
        };
        if let Err(message) = result {
            let span = if TOP_KEYS.contains(&name) {
                span
            } else {
                key.span()
            };
            errors.at(&span, name, message);
        }
    }

    match raw.routes {
        None => errors.add(
            Some(0),
            "route",
            "no routes; add at least one [[route]] table with name, listen and upstream",
        ),
        Some(routes) => {
            let span = routes.span();
            match routes.into_inner() {
                RawRoutes::List(items) if items.is_empty() => errors.at(
                    &span,
                    "route",
                    "no routes; add at least one [[route]] table with name, listen and upstream",
                ),
                RawRoutes::List(items) => {
                    let mut seen: Vec<Checked> = Vec::new();
                    for (i, item) in items.into_iter().enumerate() {
                        let mut checked =
                            check_route(i, item, default_mode, default_buffered, errors);
                        check_unique(&checked, &seen, errors);
                        config.routes.extend(checked.route.take());
                        seen.push(checked);
                    }
                }
                RawRoutes::Table => errors.at(
                    &span,
                    "route",
                    "[route] is a single table; write [[route]] (two brackets) before each route",
                ),
                RawRoutes::Scalar(kind) => errors.at(
                    &span,
                    "route",
                    format!(
                        "expected [[route]] tables, found {kind}; write each route as a \
                         [[route]] table with name, listen and upstream"
                    ),
                ),
            }
        }
    }
    check_total(&config, &raw.entries, total_span, errors);
    config
}

/// `max_buffered_total` must hold at least one connection of every route.
fn check_total(
    config: &Config,
    entries: &[(Spanned<String>, Spanned<Value>)],
    total_span: Option<Range<usize>>,
    errors: &mut Errors,
) {
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
        None => {
            // The default total: point at the max_buffered that is too large.
            let span = entries
                .iter()
                .find(|(k, _)| k.get_ref() == "max_buffered")
                .map(|(_, v)| v.span());
            match span {
                Some(span) => errors.at(&span, "max_buffered", message),
                None => errors.add(Some(0), "max_buffered_total", message),
            }
        }
    }
}

/// `4194304` -> `4MiB`, for messages.
fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// What was understood of one `[[route]]`: the name and listen address on their own, so that
/// uniqueness is checked even when another key of the route is wrong.
struct Checked {
    index: usize,
    name: Option<(String, Range<usize>)>,
    listen: Option<(Endpoint, Range<usize>)>,
    /// The whole route, if every key was valid.
    route: Option<Route>,
}

fn check_route(
    index: usize,
    item: Spanned<RawItem>,
    default_mode: Mode,
    default_buffered: u64,
    errors: &mut Errors,
) -> Checked {
    let mut checked = Checked {
        index,
        name: None,
        listen: None,
        route: None,
    };
    let table_span = item.span();
    let entries = match item.into_inner() {
        RawItem::Table(entries) => entries,
        RawItem::Other(kind) => {
            errors.at(
                &table_span,
                &format!("route[{index}]"),
                format!("expected a table, found {kind}; write each route as a [[route]] table"),
            );
            return checked;
        }
    };
    let key_of = |field: &str| format!("route[{index}].{field}");
    let mut upstream = None;
    let mut mode = None;
    let mut interface = None;
    let mut connect_timeout = None;
    let mut max_buffered = None;
    let mut max_connections = None;
    let mut idle_timeout = None;
    let mut ok = true;
    for (key, value) in &entries {
        let field = key.get_ref().as_str();
        let span = value.span();
        let v = value.get_ref();
        let result = match field {
            "name" => parse_route_name(v).map(|n| checked.name = Some((n, span.clone()))),
            "listen" => parse_listen(v).map(|e| checked.listen = Some((e, span.clone()))),
            "upstream" => parse_upstream(v).map(|e| upstream = Some(e)),
            "mode" => parse_mode(v).map(|m| mode = Some(m)),
            "interface" => parse_interface(v).map(|i| interface = Some(i)),
            "connect_timeout" => parse_connect_timeout(v).map(|d| connect_timeout = Some(d)),
            "max_buffered" => parse_max_buffered(v).map(|b| max_buffered = Some(b)),
            "max_connections" => parse_max_connections(v).map(|n| max_connections = Some(n)),
            "idle_timeout" => parse_idle_timeout(v).map(|d| idle_timeout = Some(d)),
            _ => Err(unknown_key(field, &ROUTE_KEYS, "[[route]]")),
        };
        if let Err(message) = result {
            ok = false;
            let span = if ROUTE_KEYS.contains(&field) {
                span
            } else {
                key.span()
            };
            errors.at(&span, &key_of(field), message);
        }
    }
    for (field, example) in [
        ("name", "name = \"web\""),
        ("listen", "listen = \"127.0.0.1:8080\""),
        ("upstream", "upstream = \"10.0.0.2:80\""),
    ] {
        if !entries.iter().any(|(k, _)| k.get_ref() == field) {
            ok = false;
            errors.at(
                &table_span,
                &key_of(field),
                format!("missing (required); add e.g. {example} to this [[route]]"),
            );
        }
    }
    if let (true, Some((name, _)), Some((listen, _)), Some(upstream)) =
        (ok, &checked.name, &checked.listen, upstream)
    {
        checked.route = Some(Route {
            name: name.clone(),
            listen: listen.clone(),
            upstream,
            mode: mode.unwrap_or(default_mode),
            interface,
            connect_timeout: connect_timeout.unwrap_or(Duration::from_secs(5)),
            max_buffered: max_buffered.unwrap_or(default_buffered),
            max_connections,
            idle_timeout,
        });
    }
    checked
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
    if let Some((listen, span)) = &route.listen {
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
            errors.at(
                span,
                &format!("route[{i}].listen"),
                match how {
                    Conflict::Same => format!(
                        "{listen} is already the listen address of {owner}; give each route \
                         its own address or port"
                    ),
                    Conflict::Wildcard => format!(
                        "{listen} overlaps {other} of {owner}: a wildcard address (0.0.0.0 or \
                         [::]) takes the port on every address; give each route its own port"
                    ),
                },
            );
            break;
        }
    }
}

enum Conflict {
    Same,
    Wildcard,
}

/// Whether two listen addresses cannot both be bound. Port 0 picks a fresh port each time, so
/// it never conflicts. `[::]` also takes IPv4 addresses: the daemon leaves IPV6_V6ONLY at the
/// kernel's default (`net.ipv6.bindv6only = 0`).
fn listen_conflict(a: &Endpoint, b: &Endpoint) -> Option<Conflict> {
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

fn expect_str<'v>(value: &'v Value, example: &str) -> Result<&'v str, String> {
    value.as_str().ok_or_else(|| {
        format!(
            "expected a string, found {}; write e.g. {example}",
            describe(value)
        )
    })
}

/// A value's type and, for short scalars, the value itself: `an integer (5)`.
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

fn unknown_key(key: &str, valid: &[&str], table: &str) -> String {
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
    format!(
        "unknown key; {suggestion}valid {table} keys are {}",
        names.join(", ")
    )
}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

fn parse_mode(value: &Value) -> Result<Mode, String> {
    let valid = Mode::ALL.map(Mode::as_str).join(", ");
    let s = expect_str(value, "mode = \"auto\"")?;
    Mode::ALL
        .into_iter()
        .find(|m| m.as_str() == s)
        .ok_or_else(|| format!("{s:?} is not a mode; use one of {valid}"))
}

fn parse_route_name(value: &Value) -> Result<String, String> {
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
        return Err(format!(
            "{s:?} contains {c:?}; a route name may only contain letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(s.to_owned())
}

fn parse_listen(value: &Value) -> Result<Endpoint, String> {
    let s = expect_str(value, "listen = \"127.0.0.1:8080\"")?;
    let endpoint = Endpoint::parse_listen(s).map_err(|e| e.0)?;
    check_zone(&endpoint)?;
    Ok(endpoint)
}

fn parse_upstream(value: &Value) -> Result<Endpoint, String> {
    let s = expect_str(value, "upstream = \"10.0.0.2:80\"")?;
    let endpoint = s.parse::<Endpoint>().map_err(|e| e.0)?;
    check_zone(&endpoint)?;
    Ok(endpoint)
}

fn parse_interface(value: &Value) -> Result<String, String> {
    let s = expect_str(value, "interface = \"eth0\"")?;
    addr::validate_interface_name(s).map_err(|e| e.0)?;
    if !addr::interface_exists(s) {
        return Err(format!(
            "interface {s:?} does not exist on this machine; fix the name or create the \
             interface first (ip link shows the interfaces)"
        ));
    }
    Ok(s.to_owned())
}

const DURATION_HINT: &str = "use a number with a unit, e.g. \"5s\" or \"250ms\"";

fn parse_duration(value: &Value) -> Result<Duration, String> {
    let s = match value {
        Value::String(s) => s.as_str(),
        Value::Integer(n) => {
            return Err(format!("{n} has no unit; {DURATION_HINT}, e.g. \"{n}s\""));
        }
        other => {
            return Err(format!(
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
        _ => return Err(format!("{s:?} is not a duration; {DURATION_HINT}")),
    };
    let millis = number
        .parse::<u64>()
        .map_err(|_| format!("{s:?} is not a duration; {DURATION_HINT}"))?
        .checked_mul(scale_ms)
        .ok_or_else(|| format!("{s:?} is too long; {DURATION_HINT}"))?;
    Ok(Duration::from_millis(millis))
}

fn parse_connect_timeout(value: &Value) -> Result<Duration, String> {
    let d = parse_duration(value)?;
    if d.is_zero() {
        return Err("must be more than 0; e.g. \"5s\"".into());
    }
    if d > MAX_CONNECT_TIMEOUT {
        return Err(format!(
            "{} is longer than the limit of 1h; use at most \"1h\", e.g. \"5s\"",
            value
        ));
    }
    Ok(d)
}

fn parse_idle_timeout(value: &Value) -> Result<Duration, String> {
    let d = parse_duration(value)?;
    if d.is_zero() {
        return Err(
            "must be more than 0; e.g. \"10m\" (leave the key out for no idle timeout)".into(),
        );
    }
    if d > MAX_IDLE_TIMEOUT {
        return Err(format!(
            "{value} is longer than the limit of 168h (a week); use at most \"168h\", or leave \
             the key out for no idle timeout"
        ));
    }
    Ok(d)
}

/// `sockaddr_un.sun_path` holds 108 bytes with the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

fn parse_control_socket(value: &Value) -> Result<std::path::PathBuf, String> {
    let s = expect_str(
        value,
        &format!("control_socket = \"{DEFAULT_CONTROL_SOCKET}\""),
    )?;
    if !s.starts_with('/') {
        return Err(format!(
            "{s:?} is not an absolute path; write e.g. \"{DEFAULT_CONTROL_SOCKET}\""
        ));
    }
    if s.len() > MAX_SOCKET_PATH || s.ends_with('/') || s.contains('\0') {
        return Err(format!(
            "{s:?} cannot name a Unix socket (a file path of at most {MAX_SOCKET_PATH} bytes, \
             no NUL); write e.g. \"{DEFAULT_CONTROL_SOCKET}\""
        ));
    }
    Ok(s.into())
}

fn parse_user(value: &Value) -> Result<String, String> {
    let s = expect_str(value, "user = \"spliced\"")?;
    crate::privdrop::lookup(s)?;
    Ok(s.to_owned())
}

fn parse_metrics(value: &Value) -> Result<Endpoint, String> {
    let s = expect_str(value, "metrics = \"127.0.0.1:9180\"")?;
    // Port 0 is allowed (tests); the bound address is logged.
    let endpoint = Endpoint::parse_listen(s).map_err(|e| e.0)?;
    check_zone(&endpoint)?;
    Ok(endpoint)
}

const SIZE_HINT: &str =
    "use a number of bytes or a binary unit, e.g. 4096, \"512KiB\", \"16MiB\" or \"1GiB\"";

/// A size in bytes: an integer, or a string with an optional unit `B`, `KiB`, `MiB` or `GiB`.
fn parse_size(value: &Value) -> Result<u64, String> {
    let s = match value {
        Value::Integer(n) => {
            return u64::try_from(*n).map_err(|_| format!("{n} is negative; {SIZE_HINT}"));
        }
        Value::String(s) => s.as_str(),
        other => {
            return Err(format!(
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
            return Err(format!(
                "{s:?}: write the binary unit \"{number}{binary}\" (decimal units are ambiguous); \
                 {SIZE_HINT}"
            ));
        }
        _ => return Err(format!("{s:?} is not a size; {SIZE_HINT}")),
    };
    number
        .parse::<u64>()
        .map_err(|_| format!("{s:?} is not a size; {SIZE_HINT}"))?
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large; {SIZE_HINT}"))
}

fn parse_send_buffer(value: &Value) -> Result<Option<usize>, String> {
    let bytes = parse_size(value)?;
    if bytes > MAX_SEND_BUFFER as u64 {
        return Err(format!(
            "{value} is more than the maximum of 1GiB; use e.g. \"16MiB\", or 0 for the \
             kernel's autotuning"
        ));
    }
    // At most 1 GiB, so it fits in usize.
    Ok((bytes != 0).then_some(bytes as usize))
}

fn parse_max_buffered(value: &Value) -> Result<u64, String> {
    let bytes = parse_size(value)?;
    if !(MIN_MAX_BUFFERED..=MAX_MAX_BUFFERED).contains(&bytes) {
        return Err(format!(
            "{value} is out of range; use 64KiB to 1GiB, e.g. max_buffered = \"16MiB\""
        ));
    }
    Ok(bytes)
}

fn parse_max_buffered_total(value: &Value) -> Result<u64, String> {
    let bytes = parse_size(value)?;
    if !(MIN_MAX_BUFFERED..=MAX_MAX_BUFFERED_TOTAL).contains(&bytes) {
        return Err(format!(
            "{value} is out of range; use 64KiB to 64GiB, e.g. max_buffered_total = \"512MiB\""
        ));
    }
    Ok(bytes)
}

fn parse_max_connections(value: &Value) -> Result<usize, String> {
    let n = match value {
        Value::Integer(n) => *n,
        other => {
            return Err(format!(
                "expected an integer, found {}; write e.g. max_connections = 10000",
                describe(other)
            ))
        }
    };
    match usize::try_from(n) {
        Ok(n) if (1..=MAX_CONNECTIONS).contains(&n) => Ok(n),
        _ => Err(format!(
            "{n} is out of range; use 1 to {MAX_CONNECTIONS}, e.g. max_connections = 10000"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "spliced.toml";

    fn load(text: &str) -> Config {
        Config::from_toml(Path::new(FILE), text).unwrap_or_else(|errors| {
            let errors: Vec<String> = errors.into_iter().map(|e| e.0).collect();
            panic!("should load: {errors:#?}")
        })
    }

    fn errors(text: &str) -> Vec<String> {
        match Config::from_toml(Path::new(FILE), text) {
            Ok(c) => panic!("should be refused, got {c:#?}"),
            Err(errors) => errors.into_iter().map(|e| e.0).collect(),
        }
    }

    /// The single error of `text`.
    fn error(text: &str) -> String {
        let mut errors = errors(text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        errors.remove(0)
    }

    /// A file with one valid route and `extra` appended to the route's table.
    fn route_with(extra: &str) -> String {
        format!(
            "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"10.0.0.2:80\"\n{extra}\n"
        )
    }

    /// A file with `top` at the top level and one valid route.
    fn top_with(top: &str) -> String {
        format!("{top}\n{}", route_with(""))
    }

    #[test]
    fn full_example() {
        let config = load(
            r#"
# all top-level keys optional
mode = "splice"
grace_period = "10s"
send_buffer = "4MiB"
max_connections = 500

[[route]]
name = "ghost"
listen = "127.0.0.1:8080"
upstream = "[fe80::216:3eff:fe12:3456%lo]:2368"
mode = "sockmap"
interface = "lo"
connect_timeout = "250ms"

[[route]]
name = "web.v2_b-1"
listen = "[::1]:0"
upstream = "example.com:443"
"#,
        );
        assert_eq!(config.grace_period, Duration::from_secs(10));
        assert_eq!(config.send_buffer, Some(4 << 20));
        assert_eq!(config.max_connections, 500);
        assert_eq!(config.routes.len(), 2);
        let ghost = &config.routes[0];
        assert_eq!(ghost.name, "ghost");
        assert_eq!(ghost.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(
            ghost.upstream.to_string(),
            "[fe80::216:3eff:fe12:3456%lo]:2368"
        );
        assert_eq!(ghost.mode, Mode::Sockmap);
        assert_eq!(ghost.interface.as_deref(), Some("lo"));
        assert_eq!(ghost.connect_timeout, Duration::from_millis(250));
        let web = &config.routes[1];
        assert_eq!(web.name, "web.v2_b-1");
        assert_eq!(web.mode, Mode::Splice, "the top-level mode is the default");
        assert_eq!(web.interface, None);
        assert_eq!(web.connect_timeout, Duration::from_secs(5));
        assert_eq!(web.upstream.host, Host::Name("example.com".into()));
    }

    #[test]
    fn defaults_match_config_new() {
        let config = load(&route_with(""));
        let defaults = Config::new(Vec::new());
        assert_eq!(config.grace_period, defaults.grace_period);
        assert_eq!(config.grace_period, Duration::from_secs(30));
        assert_eq!(config.send_buffer, Some(16 << 20));
        assert_eq!(config.max_connections, 10_000);
        assert_eq!(config.routes[0].mode, Mode::Auto);
        assert_eq!(config.routes[0].connect_timeout, Duration::from_secs(5));
    }

    #[test]
    fn route_constructors() {
        let route = Route::new(
            "r",
            Endpoint::parse_listen("127.0.0.1:0").unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        assert_eq!(route.mode, Mode::Auto);
        assert_eq!(route.with_mode(Mode::Copy).mode, Mode::Copy);
    }

    #[test]
    fn modes() {
        for mode in Mode::ALL {
            let config = load(&top_with(&format!("mode = \"{mode}\"")));
            assert_eq!(config.routes[0].mode, mode);
            let config = load(&route_with(&format!("mode = \"{mode}\"")));
            assert_eq!(config.routes[0].mode, mode);
        }
        let config = load(&format!(
            "mode = \"copy\"\n{}",
            route_with("mode = \"splice\"")
        ));
        assert_eq!(config.routes[0].mode, Mode::Splice, "a route's mode wins");
    }

    #[test]
    fn durations() {
        for (text, expected) in [
            ("0s", Duration::ZERO),
            ("250ms", Duration::from_millis(250)),
            ("5s", Duration::from_secs(5)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
        ] {
            let config = load(&top_with(&format!("grace_period = \"{text}\"")));
            assert_eq!(config.grace_period, expected, "{text}");
        }
        let config = load(&route_with("connect_timeout = \"1h\""));
        assert_eq!(config.routes[0].connect_timeout, Duration::from_secs(3600));
        let config = load(&route_with("connect_timeout = \"1ms\""));
        assert_eq!(config.routes[0].connect_timeout, Duration::from_millis(1));
    }

    #[test]
    fn sizes() {
        for (text, expected) in [
            ("4096", Some(4096)),
            ("\"4096\"", Some(4096)),
            ("\"4096B\"", Some(4096)),
            ("\"512KiB\"", Some(512 << 10)),
            ("\"16MiB\"", Some(16 << 20)),
            ("\"1GiB\"", Some(1 << 30)),
            ("1073741824", Some(1 << 30)),
            ("0", None),
            ("\"0\"", None),
            ("\"0MiB\"", None),
        ] {
            let config = load(&top_with(&format!("send_buffer = {text}")));
            assert_eq!(config.send_buffer, expected, "{text}");
        }
    }

    #[test]
    fn max_connections_bounds() {
        assert_eq!(load(&top_with("max_connections = 1")).max_connections, 1);
        assert_eq!(
            load(&top_with(&format!("max_connections = {MAX_CONNECTIONS}"))).max_connections,
            MAX_CONNECTIONS
        );
    }

    #[test]
    fn inline_route_tables() {
        let config = load(
            "route = [{ name = \"a\", listen = \"127.0.0.1:1\", upstream = \"10.0.0.2:80\" }]\n",
        );
        assert_eq!(config.routes[0].name, "a");
    }

    #[test]
    fn listen_addresses_that_do_not_conflict() {
        let config = load(
            r#"
[[route]]
name = "a"
listen = "127.0.0.1:0"
upstream = "10.0.0.2:80"
[[route]]
name = "b"
listen = "127.0.0.1:0"
upstream = "10.0.0.2:80"
[[route]]
name = "c"
listen = "127.0.0.1:81"
upstream = "10.0.0.2:80"
[[route]]
name = "d"
listen = "127.0.0.2:81"
upstream = "10.0.0.2:80"
[[route]]
name = "e"
listen = "[::1]:81"
upstream = "10.0.0.2:80"
"#,
        );
        assert_eq!(config.routes.len(), 5);
    }

    #[test]
    fn line_and_column() {
        let text = "a\nbé = 1\n\nxyz";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 2), (2, 1));
        // 'é' is two bytes but one column.
        assert_eq!(line_column(text, text.find('=').unwrap()), (2, 4));
        assert_eq!(line_column(text, text.find('x').unwrap()), (4, 1));
        assert_eq!(line_column(text, text.len() + 10), (4, 4));
        // Inside a multi-byte character: the character's column.
        assert_eq!(line_column(text, text.find('é').unwrap() + 1), (2, 2));
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("listen", "listen"), 0);
        assert_eq!(edit_distance("listne", "listen"), 2);
        assert_eq!(edit_distance("upstrem", "upstream"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn spec_example_error() {
        let text = r#"[[route]]
name = "a"
listen = "127.0.0.1:8080"
upstream = "10.0.0.2:80"

[[route]]
upstream = "fe80::1:80"
name = "b"
listen = "127.0.0.1:8081"
"#;
        assert_eq!(
            error(text),
            r#"spliced.toml:7:12: route[1].upstream: "fe80::1:80": an IPv6 address needs brackets: write "[fe80::1]:80" (a link-local address also needs its interface: "[fe80::1%eth0]:80")"#
        );
    }

    #[test]
    fn collects_every_error_in_file_order() {
        let text = r#"mode = "fast"
grace = 5
send_buffer = "2GiB"

[[route]]
name = "ghost"
listen = "127.0.0.1:8080"
upstream = "[fe80::1]:80"

[[route]]
name = "ghost"
listen = "127.0.0.1:8080"
upstream = "10.0.0.2:80"
mode = 3
"#;
        assert_eq!(
            errors(text),
            vec![
                r#"spliced.toml:1:8: mode: "fast" is not a mode; use one of auto, sockmap, splice, copy"#,
                r#"spliced.toml:2:1: grace: unknown key; valid top-level keys are `mode`, `grace_period`, `send_buffer`, `max_connections`, `max_buffered`, `max_buffered_total`, `control_socket`, `metrics`, `user`, [[route]] tables"#,
                r#"spliced.toml:3:15: send_buffer: "2GiB" is more than the maximum of 1GiB; use e.g. "16MiB", or 0 for the kernel's autotuning"#,
                r#"spliced.toml:8:12: route[0].upstream: "[fe80::1]:80": fe80::1 is a link-local address (fe80::/10), which exists on every interface; name the interface with "%", e.g. "[fe80::1%eth0]:80""#,
                r#"spliced.toml:11:8: route[1].name: "ghost" is already the name of route[0]; route names must be unique"#,
                r#"spliced.toml:12:10: route[1].listen: 127.0.0.1:8080 is already the listen address of route[0] ("ghost"); give each route its own address or port"#,
                r#"spliced.toml:14:8: route[1].mode: expected a string, found an integer (3); write e.g. mode = "auto""#,
            ]
        );
    }

    #[test]
    fn error_syntax() {
        assert_eq!(
            error("x = \n"),
            "spliced.toml:1:5: invalid TOML: invalid string; expected `\"`, `'`"
        );
        // Duplicate keys are a TOML error, reported by the parser.
        let e = error(&route_with("name = \"again\""));
        assert!(
            e.starts_with("spliced.toml:5:1: invalid TOML: duplicate key"),
            "{e}"
        );
    }

    #[test]
    fn error_unreadable_file() {
        let errors = Config::load(Path::new("/nonexistent/dir/spliced.toml")).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].0,
            "/nonexistent/dir/spliced.toml: cannot read the configuration file: No such file or \
             directory (os error 2)"
        );
    }

    #[test]
    fn load_reads_the_file() {
        let path =
            std::env::temp_dir().join(format!("spliced-config-test-{}.toml", std::process::id()));
        std::fs::write(&path, route_with("")).unwrap();
        let loaded = Config::load(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(loaded.unwrap().routes[0].name, "web");
    }

    #[test]
    fn error_unknown_keys() {
        assert_eq!(
            error(&top_with("grace_priod = \"1s\"")),
            "spliced.toml:1:1: grace_priod: unknown key; did you mean `grace_period`? valid \
             top-level keys are `mode`, `grace_period`, `send_buffer`, `max_connections`, \
             `max_buffered`, `max_buffered_total`, `control_socket`, `metrics`, `user`, [[route]] \
             tables"
        );
        assert_eq!(
            error(&route_with("listne = \"x\"")),
            "spliced.toml:5:1: route[0].listne: unknown key; did you mean `listen`? valid \
             [[route]] keys are `name`, `listen`, `upstream`, `mode`, `interface`, \
             `connect_timeout`, `max_buffered`, `max_connections`, `idle_timeout`"
        );
        assert_eq!(
            error(&route_with("timeout = \"1s\"")),
            "spliced.toml:5:1: route[0].timeout: unknown key; valid [[route]] keys are `name`, \
             `listen`, `upstream`, `mode`, `interface`, `connect_timeout`, `max_buffered`, \
             `max_connections`, `idle_timeout`"
        );
    }

    #[test]
    fn error_mode() {
        assert_eq!(
            error(&route_with("mode = \"Sockmap\"")),
            "spliced.toml:5:8: route[0].mode: \"Sockmap\" is not a mode; use one of auto, \
             sockmap, splice, copy"
        );
        assert_eq!(
            error(&top_with("mode = true")),
            "spliced.toml:1:8: mode: expected a string, found a boolean (true); write e.g. mode = \
             \"auto\""
        );
    }

    #[test]
    fn error_durations() {
        assert_eq!(
            error(&top_with("grace_period = 5")),
            "spliced.toml:1:16: grace_period: 5 has no unit; use a number with a unit, e.g. \"5s\" \
             or \"250ms\", e.g. \"5s\""
        );
        assert_eq!(
            error(&top_with("grace_period = 1.5")),
            "spliced.toml:1:16: grace_period: expected a duration, found a float (1.5); use a \
             number with a unit, e.g. \"5s\" or \"250ms\""
        );
        for bad in ["5", "5 s", "1.5s", "5sec", "s", "", "-1s", "1h30m"] {
            assert_eq!(
                error(&top_with(&format!("grace_period = \"{bad}\""))),
                format!(
                    "spliced.toml:1:16: grace_period: {bad:?} is not a duration; use a number \
                     with a unit, e.g. \"5s\" or \"250ms\""
                )
            );
        }
        assert_eq!(
            error(&top_with("grace_period = \"99999999999999999999h\"")),
            "spliced.toml:1:16: grace_period: \"99999999999999999999h\" is not a duration; use a \
             number with a unit, e.g. \"5s\" or \"250ms\""
        );
        assert_eq!(
            error(&top_with("grace_period = \"18446744073709551615h\"")),
            "spliced.toml:1:16: grace_period: \"18446744073709551615h\" is too long; use a \
             number with a unit, e.g. \"5s\" or \"250ms\""
        );
    }

    #[test]
    fn error_connect_timeout() {
        assert_eq!(
            error(&route_with("connect_timeout = \"0s\"")),
            "spliced.toml:5:19: route[0].connect_timeout: must be more than 0; e.g. \"5s\""
        );
        assert_eq!(
            error(&route_with("connect_timeout = \"61m\"")),
            "spliced.toml:5:19: route[0].connect_timeout: \"61m\" is longer than the limit of \
             1h; use at most \"1h\", e.g. \"5s\""
        );
        assert_eq!(
            error(&route_with("connect_timeout = 5")),
            "spliced.toml:5:19: route[0].connect_timeout: 5 has no unit; use a number with a \
             unit, e.g. \"5s\" or \"250ms\", e.g. \"5s\""
        );
    }

    #[test]
    fn error_sizes() {
        let hint = "use a number of bytes or a binary unit, e.g. 4096, \"512KiB\", \"16MiB\" or \
                    \"1GiB\"";
        assert_eq!(
            error(&top_with("send_buffer = -1")),
            format!("spliced.toml:1:15: send_buffer: -1 is negative; {hint}")
        );
        assert_eq!(
            error(&top_with("send_buffer = 1.5")),
            format!("spliced.toml:1:15: send_buffer: expected a size, found a float (1.5); {hint}")
        );
        assert_eq!(
            error(&top_with("send_buffer = \"16MB\"")),
            format!(
                "spliced.toml:1:15: send_buffer: \"16MB\": write the binary unit \"16MiB\" \
                 (decimal units are ambiguous); {hint}"
            )
        );
        assert!(error(&top_with("send_buffer = \"512k\"")).contains("\"512KiB\""));
        assert!(error(&top_with("send_buffer = \"1G\"")).contains("\"1GiB\""));
        for bad in ["16 MiB", "MiB", "1.5MiB", "16mib", "lots"] {
            assert_eq!(
                error(&top_with(&format!("send_buffer = \"{bad}\""))),
                format!("spliced.toml:1:15: send_buffer: {bad:?} is not a size; {hint}")
            );
        }
        assert_eq!(
            error(&top_with("send_buffer = \"18446744073709551615GiB\"")),
            format!(
                "spliced.toml:1:15: send_buffer: \"18446744073709551615GiB\" is too large; {hint}"
            )
        );
        assert_eq!(
            error(&top_with("send_buffer = 1073741825")),
            "spliced.toml:1:15: send_buffer: 1073741825 is more than the maximum of 1GiB; use \
             e.g. \"16MiB\", or 0 for the kernel's autotuning"
        );
    }

    #[test]
    fn error_max_connections() {
        assert_eq!(
            error(&top_with("max_connections = 0")),
            "spliced.toml:1:19: max_connections: 0 is out of range; use 1 to 100000000, e.g. \
             max_connections = 10000"
        );
        assert!(error(&top_with("max_connections = -5")).contains("-5 is out of range"));
        assert!(error(&top_with("max_connections = 100000001")).contains("out of range"));
        assert_eq!(
            error(&top_with("max_connections = \"10000\"")),
            "spliced.toml:1:19: max_connections: expected an integer, found a string; write e.g. \
             max_connections = 10000"
        );
    }

    #[test]
    fn error_no_routes() {
        let msg =
            "route: no routes; add at least one [[route]] table with name, listen and upstream";
        assert_eq!(error(""), format!("spliced.toml:1:1: {msg}"));
        assert_eq!(
            error("mode = \"copy\"\n"),
            format!("spliced.toml:1:1: {msg}")
        );
        assert_eq!(error("route = []\n"), format!("spliced.toml:1:9: {msg}"));
    }

    #[test]
    fn error_route_shape() {
        assert_eq!(
            error("[route]\nname = \"a\"\n"),
            "spliced.toml:1:1: route: [route] is a single table; write [[route]] (two brackets) \
             before each route"
        );
        assert_eq!(
            error("route = \"a\"\n"),
            "spliced.toml:1:9: route: expected [[route]] tables, found a string; write each \
             route as a [[route]] table with name, listen and upstream"
        );
        assert_eq!(
            error("route = [[1]]\n"),
            "spliced.toml:1:10: route[0]: expected a table, found an array; write each route as \
             a [[route]] table"
        );
        assert_eq!(
            error("route = [true]\n"),
            "spliced.toml:1:10: route[0]: expected a table, found a boolean; write each route as \
             a [[route]] table"
        );
    }

    #[test]
    fn error_missing_keys() {
        assert_eq!(
            errors("mode = \"copy\"\n\n[[route]]\nmode = \"copy\"\n"),
            vec![
                "spliced.toml:3:1: route[0].name: missing (required); add e.g. name = \"web\" to \
                 this [[route]]",
                "spliced.toml:3:1: route[0].listen: missing (required); add e.g. listen = \
                 \"127.0.0.1:8080\" to this [[route]]",
                "spliced.toml:3:1: route[0].upstream: missing (required); add e.g. upstream = \
                 \"10.0.0.2:80\" to this [[route]]",
            ]
        );
    }

    #[test]
    fn error_route_names() {
        let name = |n: &str| {
            format!("[[route]]\nname = {n}\nlisten = \"127.0.0.1:1\"\nupstream = \"10.0.0.2:80\"\n")
        };
        assert_eq!(
            error(&name("\"my route\"")),
            "spliced.toml:2:8: route[0].name: \"my route\" contains ' '; a route name may only \
             contain letters, digits, '_', '.' and '-'"
        );
        assert_eq!(
            error(&name("\"\"")),
            "spliced.toml:2:8: route[0].name: the name is empty; use letters, digits, '_', '.' \
             and '-', e.g. \"web\""
        );
        assert_eq!(
            error(&name("7")),
            "spliced.toml:2:8: route[0].name: expected a string, found an integer (7); write e.g. \
             name = \"web\""
        );
        // Uniqueness is checked even when another key of the route is wrong.
        let text =
            "[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"10.0.0.2:80\"\n\
                    [[route]]\nname = \"a\"\nlisten = \"127.0.0.1:2\"\nupstream = \"bad:0\"\n";
        assert_eq!(
            errors(text),
            vec![
                "spliced.toml:6:8: route[1].name: \"a\" is already the name of route[0]; route \
                 names must be unique",
                "spliced.toml:8:12: route[1].upstream: \"bad:0\": port 0 is not a valid upstream \
                 port; use 1 to 65535 (port 0 only means \"any free port\" in a listen address)",
            ]
        );
    }

    #[test]
    fn error_listen() {
        let listen = |l: &str| {
            format!("[[route]]\nname = \"a\"\nlisten = \"{l}\"\nupstream = \"10.0.0.2:80\"\n")
        };
        assert_eq!(
            error(&listen("example.com:80")),
            "spliced.toml:3:10: route[0].listen: \"example.com:80\": listen addresses must be IP \
             literals, not host names; write e.g. \"127.0.0.1:80\" or \"[::]:80\""
        );
        assert_eq!(
            error(&listen("[fe80::1%nosuchif0]:80")),
            "spliced.toml:3:10: route[0].listen: interface \"nosuchif0\" (the zone of \
             \"[fe80::1%nosuchif0]:80\") does not exist on this machine; fix the name or create \
             the interface first (ip link shows the interfaces)"
        );
        assert_eq!(
            error("[[route]]\nname = \"a\"\nlisten = 8080\nupstream = \"10.0.0.2:80\"\n"),
            "spliced.toml:3:10: route[0].listen: expected a string, found an integer (8080); \
             write e.g. listen = \"127.0.0.1:8080\""
        );
    }

    #[test]
    fn error_listen_conflicts() {
        let two = |a: &str, b: &str| {
            format!(
                "[[route]]\nname = \"a\"\nlisten = \"{a}\"\nupstream = \"10.0.0.2:80\"\n\
                 [[route]]\nname = \"b\"\nlisten = \"{b}\"\nupstream = \"10.0.0.2:80\"\n"
            )
        };
        assert_eq!(
            error(&two("[::1]:80", "[0:0::1]:80")),
            "spliced.toml:7:10: route[1].listen: [::1]:80 is already the listen address of \
             route[0] (\"a\"); give each route its own address or port"
        );
        assert_eq!(
            error(&two("127.0.0.1:80", "0.0.0.0:80")),
            "spliced.toml:7:10: route[1].listen: 0.0.0.0:80 overlaps 127.0.0.1:80 of route[0] \
             (\"a\"): a wildcard address (0.0.0.0 or [::]) takes the port on every address; give \
             each route its own port"
        );
        assert!(error(&two("[::]:80", "10.0.0.1:80")).contains("overlaps [::]:80"));
        assert!(error(&two("[::]:80", "[::1]:80")).contains("overlaps"));
        // An IPv4 wildcard leaves IPv6 addresses free.
        load(&two("0.0.0.0:80", "[::1]:80"));
    }

    #[test]
    fn error_upstream() {
        let upstream = |u: &str| {
            format!("[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"{u}\"\n")
        };
        assert_eq!(
            error(&upstream("[fe80::1%nosuchif0]:2368")),
            "spliced.toml:4:12: route[0].upstream: interface \"nosuchif0\" (the zone of \
             \"[fe80::1%nosuchif0]:2368\") does not exist on this machine; fix the name or create \
             the interface first (ip link shows the interfaces)"
        );
        assert_eq!(
            error(&upstream("10.0.0.1%eth0:80")),
            "spliced.toml:4:12: route[0].upstream: \"10.0.0.1%eth0:80\": a zone (\"%eth0\") only \
             applies to IPv6 link-local addresses, not IPv4; remove it: write \"10.0.0.1:80\""
        );
        // A zone index is checked when the address is resolved, not here.
        load(&upstream("[fe80::1%4000000000]:2368"));
    }

    #[test]
    fn error_interface() {
        assert_eq!(
            error(&route_with("interface = \"nosuchif0\"")),
            "spliced.toml:5:13: route[0].interface: interface \"nosuchif0\" does not exist on \
             this machine; fix the name or create the interface first (ip link shows the \
             interfaces)"
        );
        assert_eq!(
            error(&route_with("interface = \"a/b\"")),
            "spliced.toml:5:13: route[0].interface: interface name \"a/b\" contains '/', which \
             Linux interface names cannot contain (ip link lists the interfaces)"
        );
        assert_eq!(
            error(&route_with("interface = \"\"")),
            "spliced.toml:5:13: route[0].interface: the interface name is empty; name an \
             interface, e.g. \"eth0\" (ip link lists them)"
        );
        assert_eq!(
            error(&route_with("interface = [\"lo\"]")),
            "spliced.toml:5:13: route[0].interface: expected a string, found an array; write e.g. \
             interface = \"eth0\""
        );
    }

    #[test]
    fn check_zone_messages() {
        assert!(check_zone(&"[fe80::1%lo]:80".parse().unwrap()).is_ok());
        assert!(check_zone(&"[fe80::1%7]:80".parse().unwrap()).is_ok());
        assert!(check_zone(&"10.0.0.1:80".parse().unwrap()).is_ok());
        assert_eq!(
            check_zone(&"[fe80::1%nosuchif0]:80".parse().unwrap()).unwrap_err(),
            "interface \"nosuchif0\" (the zone of \"[fe80::1%nosuchif0]:80\") does not exist on \
             this machine; fix the name or create the interface first (ip link shows the \
             interfaces)"
        );
    }

    #[test]
    fn mode_names() {
        assert_eq!(
            Mode::ALL.map(Mode::as_str),
            ["auto", "sockmap", "splice", "copy"]
        );
        assert_eq!(Mode::Sockmap.to_string(), "sockmap");
        assert_eq!(EX_USAGE, 64);
    }

    #[test]
    fn max_buffered_defaults_and_overrides() {
        let config = load(&route_with(""));
        assert_eq!(config.routes[0].max_buffered, DEFAULT_MAX_BUFFERED);
        assert_eq!(config.max_buffered_total, DEFAULT_MAX_BUFFERED_TOTAL);
        let text = "max_buffered = \"8MiB\"\nmax_buffered_total = \"1GiB\"\n".to_owned()
            + &route_with("")
            + &route_with("max_buffered = \"64KiB\"")
                .replace("\"web\"", "\"two\"")
                .replace("127.0.0.1:8080", "127.0.0.1:8081");
        let config = load(&text);
        assert_eq!(config.max_buffered_total, 1 << 30);
        assert_eq!(config.routes[0].max_buffered, 8 << 20);
        assert_eq!(config.routes[1].max_buffered, 64 << 10);
        assert_eq!(
            load(&route_with("max_buffered = 1048576")).routes[0].max_buffered,
            1 << 20
        );
    }

    #[test]
    fn error_max_buffered() {
        assert_eq!(
            error(&top_with("max_buffered = \"4KiB\"")),
            "spliced.toml:1:16: max_buffered: \"4KiB\" is out of range; use 64KiB to 1GiB, e.g. \
             max_buffered = \"16MiB\""
        );
        assert_eq!(
            error(&route_with("max_buffered = \"2GiB\"")),
            "spliced.toml:5:16: route[0].max_buffered: \"2GiB\" is out of range; use 64KiB to \
             1GiB, e.g. max_buffered = \"16MiB\""
        );
        assert_eq!(
            error(&top_with("max_buffered_total = \"65GiB\"")),
            "spliced.toml:1:22: max_buffered_total: \"65GiB\" is out of range; use 64KiB to \
             64GiB, e.g. max_buffered_total = \"512MiB\""
        );
        assert_eq!(
            error(&top_with("max_buffered_total = \"1MiB\"")),
            "spliced.toml:1:22: max_buffered_total: 1MiB is less than the largest max_buffered \
             (16MiB); raise max_buffered_total to at least 16MiB or lower max_buffered"
        );
        assert_eq!(
            error(&top_with("max_buffered = \"1GiB\"")),
            "spliced.toml:1:16: max_buffered: 512MiB is less than the largest max_buffered \
             (1GiB); raise max_buffered_total to at least 1GiB or lower max_buffered"
        );
    }

    #[test]
    fn route_limits_and_timeouts() {
        let config = load(&route_with(""));
        assert_eq!(config.routes[0].max_connections, None);
        assert_eq!(config.routes[0].idle_timeout, None);
        let config = load(&route_with("max_connections = 3\nidle_timeout = \"90s\""));
        assert_eq!(config.routes[0].max_connections, Some(3));
        assert_eq!(config.routes[0].idle_timeout, Some(Duration::from_secs(90)));
        assert_eq!(
            load(&route_with("idle_timeout = \"168h\"")).routes[0].idle_timeout,
            Some(MAX_IDLE_TIMEOUT)
        );
    }

    #[test]
    fn error_route_max_connections() {
        assert_eq!(
            error(&route_with("max_connections = 0")),
            "spliced.toml:5:19: route[0].max_connections: 0 is out of range; use 1 to 100000000, \
             e.g. max_connections = 10000"
        );
        assert_eq!(
            error(&route_with("max_connections = \"5\"")),
            "spliced.toml:5:19: route[0].max_connections: expected an integer, found a string; \
             write e.g. max_connections = 10000"
        );
    }

    #[test]
    fn error_idle_timeout() {
        assert_eq!(
            error(&route_with("idle_timeout = \"0s\"")),
            "spliced.toml:5:16: route[0].idle_timeout: must be more than 0; e.g. \"10m\" (leave \
             the key out for no idle timeout)"
        );
        assert_eq!(
            error(&route_with("idle_timeout = \"169h\"")),
            "spliced.toml:5:16: route[0].idle_timeout: \"169h\" is longer than the limit of 168h \
             (a week); use at most \"168h\", or leave the key out for no idle timeout"
        );
        assert_eq!(
            error(&route_with("idle_timeout = 60")),
            "spliced.toml:5:16: route[0].idle_timeout: 60 has no unit; use a number with a unit, \
             e.g. \"5s\" or \"250ms\", e.g. \"60s\""
        );
    }

    #[test]
    fn control_socket_and_metrics() {
        let config = load(&route_with(""));
        assert_eq!(
            config.control_socket,
            std::path::PathBuf::from(DEFAULT_CONTROL_SOCKET)
        );
        assert!(config.metrics.is_none(), "metrics are off by default");
        let config = load(&top_with(
            "control_socket = \"/tmp/s.sock\"\nmetrics = \"[::1]:9180\"",
        ));
        assert_eq!(
            config.control_socket,
            std::path::PathBuf::from("/tmp/s.sock")
        );
        assert_eq!(config.metrics.unwrap().to_string(), "[::1]:9180");
    }

    #[test]
    fn error_control_socket() {
        assert_eq!(
            error(&top_with("control_socket = \"run/s.sock\"")),
            "spliced.toml:1:18: control_socket: \"run/s.sock\" is not an absolute path; write \
             e.g. \"/run/spliced/control.sock\""
        );
        let long = format!("/{}", "a".repeat(107));
        assert_eq!(
            error(&top_with(&format!("control_socket = \"{long}\""))),
            format!(
                "spliced.toml:1:18: control_socket: \"{long}\" cannot name a Unix socket (a file \
                 path of at most 107 bytes, no NUL); write e.g. \"/run/spliced/control.sock\""
            )
        );
        assert_eq!(
            error(&top_with("control_socket = 1")),
            "spliced.toml:1:18: control_socket: expected a string, found an integer (1); write \
             e.g. control_socket = \"/run/spliced/control.sock\""
        );
    }

    #[test]
    fn error_metrics() {
        assert_eq!(
            error(&top_with("metrics = \"localhost:9180\"")),
            "spliced.toml:1:11: metrics: \"localhost:9180\": listen addresses must be IP \
             literals, not host names; write e.g. \"127.0.0.1:9180\" or \"[::1]:9180\""
        );
        assert_eq!(
            error(&top_with("metrics = true")),
            "spliced.toml:1:11: metrics: expected a string, found a boolean (true); write e.g. \
             metrics = \"127.0.0.1:9180\""
        );
    }

    #[test]
    fn user_key() {
        assert_eq!(load(&route_with("")).user, None, "stays root by default");
        assert_eq!(
            load(&top_with("user = \"nobody\"")).user.as_deref(),
            Some("nobody")
        );
        assert_eq!(
            error(&top_with("user = \"no-such-user-spliced\"")),
            "spliced.toml:1:8: user: user \"no-such-user-spliced\" does not exist on this \
             machine; create it (e.g. useradd --system --no-create-home --shell \
             /usr/sbin/nologin no-such-user-spliced) or remove the key to stay root"
        );
        assert_eq!(
            error(&top_with("user = 0")),
            "spliced.toml:1:8: user: expected a string, found an integer (0); write e.g. user = \
             \"spliced\""
        );
    }
}
