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
//! xdp = ["eth0"]           # interfaces where the XDP front enforces the routes' rules
//! xdp_mode = "auto"        # or "generic": generic XDP everywhere (for a veth; docs/xdp.md)
//! workers = 2              # threads that accept, dial and copy; default: one per core
//! pin_lanes = true         # one lane per core: each pinned to its core (forward/pin.rs)
//!
//! [[route]]
//! name = "ghost"                                   # required, unique, [A-Za-z0-9_.-]+
//! listen = "127.0.0.1:8080"                        # required: an IP literal and a port
//! upstream = "[fe80::216:3eff:fe12:3456%lxdbr0]:2368"  # required: IP literal or host name,
//!                                    # or a list of them and { address, weight, backup } tables
//! balance = "roundrobin"                           # optional: roundrobin | leastconn | source
//! health_check = { interval = "2s", timeout = "1s", rise = 2, fall = 3 }  # optional
//! mode = "sockmap"                                 # optional, overrides top-level mode
//! interface = "lxdbr0"                             # optional: SO_BINDTODEVICE for the dial
//! connect_timeout = "5s"                           # optional, default 5s
//! max_buffered = "16MiB"                           # optional, overrides the top-level one
//! max_connections = 100                            # optional: live connections of this route
//! idle_timeout = "10m"                             # optional: close after this long without data
//! allow = ["198.51.100.0/24", "2001:db8:1::/48"]   # optional: only these sources may connect
//! deny = ["198.51.100.66/32"]                      # optional: never these (deny wins)
//! syn_rate = 20                                    # optional: new connections/s per source
//! accept_proxy = ["198.51.100.0/24"]               # optional: sources that must send a PROXY
//!                                    # header (front proxies); read within peek_timeout
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
//! - Interfaces named in `interface`, in a zone or in `xdp` must exist when the file is checked.
//! - `allow` and `deny` are lists of prefixes (`198.51.100.0/24`, `2001:db8::/32`, or a bare
//!   address); a problem is reported at the element. `syn_rate` is 1 to 1,000,000.
//! - `accept_proxy` is a non-empty list of prefixes in the same form: a connection from a
//!   source in it must begin with a PROXY v1 or v2 header, read within the route's
//!   `peek_timeout` (default 5s); IPv4-mapped sources match IPv4 prefixes.
//!
//! Defaults: `mode = "auto"`, `grace_period = "30s"`, `send_buffer = "16MiB"`,
//! `max_connections = 10000`, `connect_timeout = "5s"`, `max_buffered = "16MiB"` (64KiB to
//! 1GiB), `max_buffered_total = "512MiB"` (at least every route's `max_buffered`, at most 64GiB).
//!
//! [`Config::from_toml`] reports every problem it finds, not just the first, each as
//! `FILE:LINE:COLUMN: KEY: what is wrong; what would be valid`, where KEY is a top-level key
//! (`grace_period`) or a route key (`route[1].upstream`, counting routes from 0).
use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    addr::{self, Endpoint},
    upstream::UpstreamSpec,
    xdp::{Prefix, SourceRules},
};

mod check;
mod document;
mod route_match;
mod upstream;
mod value;

pub use route_match::{RouteMatch, DEFAULT_PEEK_TIMEOUT, MAX_PEEK_TIMEOUT};
pub use value::Problem;

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
/// The most `workers` a configuration may ask for.
pub const MAX_WORKERS: usize = 1024;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
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
    /// The upstream servers, their balance and health checks. With matches, where the
    /// connections no match takes go; no servers then means those are refused.
    pub upstream: UpstreamSpec,
    /// The `[[route.match]]` tables, first match wins; empty: no peek, every connection goes
    /// to `upstream` at once.
    pub matches: Vec<RouteMatch>,
    /// How long a route with matches waits for the client's first bytes.
    pub peek_timeout: Duration,
    /// The PROXY protocol header written to the upstream first; a match may override it.
    pub proxy_protocol: Option<crate::proxy_header::Version>,
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
    /// `allow`, `deny`, `syn_rate`: who may connect, how often (XDP front and accept).
    pub rules: SourceRules,
    /// `accept_proxy`: sources (front proxies) whose connections must begin with a PROXY
    /// header; empty: none, every connection's bytes are data.
    pub accept_proxy: Vec<Prefix>,
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
    /// `xdp`: interfaces where the XDP front enforces the routes' rules; empty: none.
    pub xdp: Vec<String>,
    /// `xdp_mode`: native where the driver has it (`auto`), or generic everywhere.
    pub xdp_mode: crate::xdp::config::XdpModeChoice,
    /// `workers`: the runtime's worker threads; `None`: [`Config::worker_threads`]' default.
    pub workers: Option<usize>,
    /// `pin_lanes`: pin each lane to its core when there is one lane per core (default true).
    pub pin_lanes: bool,
}

/// One configuration problem: where it is, which key, what is wrong and how to fix it.
/// Displayed as `FILE:LINE:COLUMN: KEY: message` (parts that do not apply are left out).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The configuration file; `None` for command-line options.
    pub file: Option<PathBuf>,
    /// 1-based line and column (in characters); `None` for problems of the whole file.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// A top-level key (`grace_period`), a route key (`route[1].upstream`), an option
    /// (`--listen`), or empty.
    pub key: String,
    /// What is wrong and what would be valid.
    pub message: String,
}

impl ConfigError {
    /// A problem of a command-line option or of the command line as a whole (`key` empty).
    pub fn option(key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: None,
            line: None,
            column: None,
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}:", file.display())?;
            if let (Some(line), Some(column)) = (self.line, self.column) {
                write!(f, "{line}:{column}:")?;
            }
            f.write_str(" ")?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// What `spliced check` prints of a route: its listener and upstream, then each match in the
/// order they are tried (`  match[0] sni=blog.example.com -> [fe80::2%lxdbr0]:443`).
pub fn describe_route(route: &Route) -> String {
    let mut text = format!(
        "route {}: listen {}, upstream {}, mode {}\n",
        route.name,
        route.listen,
        route.upstream_text(),
        route.mode
    );
    if !route.accept_proxy.is_empty() {
        let list: Vec<String> = route.accept_proxy.iter().map(|p| p.to_string()).collect();
        text += &format!(
            "  accept_proxy {}: a PROXY v1/v2 header required from these sources within {:?}\n",
            list.join(", "),
            route.peek_timeout
        );
    }
    if !route.matches.is_empty() {
        text += &format!(
            "  peek_timeout {:?}; first match wins:\n",
            route.peek_timeout
        );
    }
    for (i, m) in route.matches.iter().enumerate() {
        text += &format!("  match[{i}] {} -> {}", m.rule, m.upstream);
        if let Some(mode) = m.mode {
            text += &format!(" (mode {mode})");
        }
        if let Some(v) = m.proxy_protocol.or(route.proxy_protocol) {
            text += &format!(" (PROXY {v})");
        }
        text.push('\n');
    }
    text
}

/// Where one connection goes, once routing chose: the route's keys or its match's.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub upstream: &'a UpstreamSpec,
    pub mode: Mode,
    pub interface: Option<&'a str>,
    pub connect_timeout: Duration,
    pub proxy_protocol: Option<crate::proxy_header::Version>,
}

impl Route {
    /// A route to one upstream with the default mode (auto), no interface and a 5 s connect
    /// timeout.
    pub fn new(name: impl Into<String>, listen: Endpoint, upstream: Endpoint) -> Self {
        Route {
            name: name.into(),
            listen,
            upstream: UpstreamSpec::single(upstream),
            matches: Vec::new(),
            peek_timeout: DEFAULT_PEEK_TIMEOUT,
            proxy_protocol: None,
            mode: Mode::Auto,
            interface: None,
            connect_timeout: Duration::from_secs(5),
            max_buffered: DEFAULT_MAX_BUFFERED,
            max_connections: None,
            idle_timeout: None,
            rules: SourceRules::default(),
            accept_proxy: Vec::new(),
        }
    }

    /// Whether a connection from `source` must begin with a PROXY header (`accept_proxy`);
    /// an IPv4-mapped source matches IPv4 prefixes.
    pub fn trusts(&self, source: std::net::IpAddr) -> bool {
        self.accept_proxy.iter().any(|p| p.contains(source))
    }

    /// Where the connections of match `index` (or, for `None`, of no match) go: the match's
    /// keys where it sets them, the route's otherwise. `None` when there is no such upstream.
    pub fn target(&self, index: Option<usize>) -> Option<Target<'_>> {
        let Some(i) = index else {
            if !self.has_default() {
                return None;
            }
            return Some(Target {
                upstream: &self.upstream,
                mode: self.mode,
                interface: self.interface.as_deref(),
                connect_timeout: self.connect_timeout,
                proxy_protocol: self.proxy_protocol,
            });
        };
        let m = self.matches.get(i)?;
        Some(Target {
            upstream: &m.upstream,
            mode: m.mode.unwrap_or(self.mode),
            interface: m.interface.as_deref().or(self.interface.as_deref()),
            connect_timeout: m.connect_timeout.unwrap_or(self.connect_timeout),
            proxy_protocol: m.proxy_protocol.or(self.proxy_protocol),
        })
    }

    /// Whether connections no match takes have somewhere to go.
    pub fn has_default(&self) -> bool {
        !self.upstream.servers.is_empty()
    }

    /// The route's mode and each match's own.
    pub fn modes(&self) -> impl Iterator<Item = Mode> + '_ {
        std::iter::once(self.mode).chain(self.matches.iter().filter_map(|m| m.mode))
    }

    /// The route's upstream for messages: the address, or what happens without one.
    pub fn upstream_text(&self) -> String {
        if self.has_default() {
            self.upstream.to_string()
        } else {
            "(none: connections no match takes are refused)".to_owned()
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
            xdp: Vec::new(),
            xdp_mode: crate::xdp::config::XdpModeChoice::Auto,
            workers: None,
            pin_lanes: true,
        }
    }

    /// The worker threads of the runtime that accepts, routes, dials and runs the copy path:
    /// `workers`, or one per core. Fewer suit a host whose cores its containers need: on two
    /// shared cores one worker cost ~10 % less CPU per short connection than two, at the
    /// same rate with 4 clients and 9 % below it with 8 (docs/profiles.md). Bulk transfers
    /// on splice run on threads of their own (forward/lanes.rs), sockmap's in the kernel.
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        })
    }

    /// Parses and checks a configuration file's text; `path` only names the file in errors.
    ///
    /// Returns every error found (a TOML syntax error stops the parse and is the only one).
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, Vec<ConfigError>> {
        let mut errors = document::Errors::default();
        let config = match toml_edit::ImDocument::parse(text) {
            Ok(doc) => Some(check::check(doc.as_table(), &mut errors)),
            Err(e) => {
                errors.syntax(&e);
                None
            }
        };
        match config {
            Some(config) if errors.is_empty() => Ok(config),
            _ => Err(errors.render(path, text)),
        }
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::from_toml(path, &text),
            Err(e) => Err(vec![ConfigError {
                file: Some(path.to_owned()),
                line: None,
                column: None,
                key: String::new(),
                message: format!("cannot read the configuration file: {e}"),
            }]),
        }
    }
}

/// Checks that a zone given by name names an existing interface. Zones by index are checked
/// when the address is resolved.
pub fn check_zone(endpoint: &Endpoint) -> Result<(), Problem> {
    match endpoint.zone_name() {
        Some(name) if !addr::interface_exists(name) => Err(Problem(format!(
            "interface {name:?} (the zone of \"{endpoint}\") does not exist on this machine; \
             fix the name or create the interface first (ip link shows the interfaces)"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
