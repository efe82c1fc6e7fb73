//! Command line (clap).
//!
//! Four forms:
//!
//! - `spliced --listen ADDR --upstream ADDR [--mode auto|sockmap|splice|copy]` forwards one
//!   route, named "cli";
//! - `spliced --config FILE` runs every route of a TOML file (see [`crate::config`]);
//! - `spliced check --config FILE` validates a file and exits;
//! - `spliced status [--socket PATH | --config FILE]` lists the running daemon's connections.
use std::path::PathBuf;

use clap::{ArgGroup, Parser, Subcommand};

use crate::{
    addr::{AddrError, Endpoint},
    config::{check_zone, Config, ConfigError, Mode, Route},
};

/// The route name of the `--listen/--upstream` form.
pub const CLI_ROUTE: &str = "cli";

const ABOUT: &str = "A TCP forwarder that splices connections inside the kernel.";

const LONG_ABOUT: &str = "\
A TCP forwarder that splices connections inside the kernel.

spliced accepts TCP connections on a listen address and forwards each one to an upstream. \
With the sockmap mode the bytes move socket to socket inside the kernel (an eBPF sk_skb \
verdict redirects them) and never reach userspace; splice and copy are the fallbacks. Half-closes are \
carried through, and SIGINT/SIGTERM drain live connections for a grace period.

Upstreams may be IP literals, host names (resolved at every connection) or link-local IPv6 \
addresses with their interface, e.g. \"[fe80::1%lxdbr0]:2368\".";

const USAGE: &str = "\
spliced --listen <ADDR> --upstream <ADDR> [--mode <MODE>]
       spliced --config <FILE>
       spliced check --config <FILE>
       spliced status [--socket <PATH> | --config <FILE>]";

const AFTER_HELP: &str = "\
Examples:
  spliced --listen 127.0.0.1:8080 --upstream '[fe80::216:3eff:fe12:3456%lxdbr0]:2368'
  spliced --config /etc/spliced.toml
  spliced check --config /etc/spliced.toml
  spliced status

An invalid address or configuration exits with status 64 (EX_USAGE).";

/// spliced's command line.
#[derive(Debug, Parser)]
#[command(
    name = "spliced",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    override_usage = USAGE,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    group(ArgGroup::new("source").args(["listen", "config"]).required(true)),
)]
pub struct Cli {
    /// Address to accept connections on: an IP literal and a port, e.g. 127.0.0.1:8080 or
    /// [::]:8080 (port 0 picks a free port).
    #[arg(
        long,
        value_name = "ADDR",
        requires = "upstream",
        conflicts_with = "config"
    )]
    pub listen: Option<String>,

    /// Where to forward each connection: ip:port, [ipv6]:port, [fe80::1%IFACE]:port or
    /// name:port.
    #[arg(
        long,
        value_name = "ADDR",
        requires = "listen",
        conflicts_with = "config"
    )]
    pub upstream: Option<String>,

    /// Data path for the --listen route (default: auto, sockmap when the kernel supports it).
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        requires = "listen",
        conflicts_with = "config"
    )]
    pub mode: Option<Mode>,

    /// Run every route of this TOML configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands; without one, spliced runs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a configuration file (addresses, interfaces, keys) without binding anything.
    Check {
        /// The TOML configuration file to check.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// List the running daemon's live connections: route, client, upstream, data path, bytes
    /// each way, age and idle time (asks over the control socket; root only).
    Status {
        /// The daemon's control socket [default: /run/spliced/control.sock].
        #[arg(long, value_name = "PATH", conflicts_with = "config")]
        socket: Option<PathBuf>,
        /// Take the control socket from this configuration file's `control_socket`.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

impl Cli {
    /// The configuration of the run forms: the one route of `--listen/--upstream`, or the file
    /// of `--config` (also for `check --config`). Returns every error found.
    pub fn into_config(self) -> Result<Config, Vec<ConfigError>> {
        match self.command {
            Some(Command::Check { config })
            | Some(Command::Status {
                config: Some(config),
                ..
            }) => return Config::load(&config),
            Some(Command::Status { .. }) => {
                return Err(vec![ConfigError::option(
                    "",
                    "status takes no configuration; give --config FILE",
                )])
            }
            None => {}
        }
        if let Some(path) = self.config {
            return Config::load(&path);
        }
        let (Some(listen), Some(upstream)) = (self.listen, self.upstream) else {
            return Err(vec![ConfigError::option(
                "",
                "nothing to run; give --listen ADDR --upstream ADDR, or --config FILE",
            )]);
        };
        let listen = endpoint("--listen", Endpoint::parse_listen(&listen));
        let upstream = endpoint("--upstream", upstream.parse());
        match (listen, upstream) {
            (Ok(listen), Ok(upstream)) => {
                let route = Route::new(CLI_ROUTE, listen, upstream)
                    .with_mode(self.mode.unwrap_or(Mode::Auto));
                Ok(Config::new(vec![route]))
            }
            (listen, upstream) => Err([listen.err(), upstream.err()]
                .into_iter()
                .flatten()
                .collect()),
        }
    }
}

/// Checks a parsed address (and that its zone interface exists), naming the option in errors.
fn endpoint(option: &str, parsed: Result<Endpoint, AddrError>) -> Result<Endpoint, ConfigError> {
    let e = parsed.map_err(|e| ConfigError::option(option, e.to_string()))?;
    check_zone(&e).map_err(|p| ConfigError::option(option, p.0))?;
    Ok(e)
}

#[cfg(test)]
mod tests;
