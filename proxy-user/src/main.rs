//! The `spliced` binary: parses the command line, sets up logging, runs the daemon until
//! SIGINT or SIGTERM.
use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{anyhow, Context as _, Result};
use clap::Parser as _;
use spliced::{
    cli::{Cli, Command},
    config::{Config, ConfigError, DEFAULT_CONTROL_SOCKET, EX_USAGE},
    log_time::LogTime,
    log_writer,
    systemd::Inherited,
    Daemon,
};
use tracing::{error, info, warn};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(&e),
    };
    match &cli.command {
        Some(Command::Check { config }) => {
            init_logging(None);
            check(config)
        }
        Some(Command::Status { socket, config }) => {
            init_logging(None);
            status(socket.as_deref(), config.as_deref())
        }
        None => serve(cli, daemon_log()),
    }
}

/// `spliced check FILE`.
fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(c) => {
            println!("{}: ok, {} route(s)", path.display(), c.routes.len());
            if !c.xdp.is_empty() {
                let generic = c.xdp_mode == spliced::xdp::config::XdpModeChoice::Generic;
                let mode = if generic { " in generic mode" } else { "" };
                println!("xdp: the XDP front on {}{mode}", c.xdp.join(", "));
            }
            for route in &c.routes {
                for rule in route.rules.describe() {
                    println!("route {}: {rule}", route.name);
                }
            }
            let described =
                |r: &&spliced::config::Route| !r.matches.is_empty() || !r.accept_proxy.is_empty();
            for r in c.routes.iter().filter(described) {
                print!("{}", spliced::config::describe_route(r));
            }
            ExitCode::SUCCESS
        }
        Err(errors) => usage_errors(&errors),
    }
}

/// `spliced status [--socket PATH | --config FILE]`.
fn status(socket: Option<&Path>, config: Option<&Path>) -> ExitCode {
    let path = match (socket, config) {
        (Some(socket), _) => socket.to_owned(),
        (None, Some(file)) => match Config::load(file) {
            Ok(c) => c.control_socket,
            Err(errors) => return usage_errors(&errors),
        },
        (None, None) => DEFAULT_CONTROL_SOCKET.into(),
    };
    match spliced::status::query(&path) {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
fn serve(cli: Cli, log: log_writer::LogWriter) -> ExitCode {
    // Kept for SIGHUP.
    let config_path = cli.config.clone();
    let config = match cli.into_config() {
        Ok(c) => c,
        Err(errors) => return usage_errors(&errors),
    };
    // Before any thread exists: this reads and removes the LISTEN_* variables.
    let inherited = match spliced::systemd::listen_fds() {
        Ok(i) => i,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    raise_fd_limit();
    // Before any route is bound: a route listens with a socket per lane.
    spliced::forward::lanes::plan(config.worker_threads(), config.pin_lanes);
    // Idle blocking-pool threads go after a second: a privilege drop waits for the ones that
    // were started with root's credentials (see privdrop).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads())
        .enable_all()
        .thread_keep_alive(Duration::from_secs(1))
        .build()
        .context("cannot start the runtime");
    let result = runtime.and_then(|r| r.block_on(run(config, config_path, inherited, log)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    config: Config,
    path: Option<PathBuf>,
    inherited: Vec<Inherited>,
    log: log_writer::LogWriter,
) -> Result<()> {
    let mut grace = config.grace_period;
    // Before anything is bound: a SIGTERM right after the "listening on" line must stop the
    // daemon gracefully, not kill it.
    let mut signals = Signals::new().context("cannot install the signal handlers")?;
    let routes = config.routes.len();
    let user = config.user.clone();
    // The error's text is complete (it names the route and the cause): no context added.
    let mut daemon = Daemon::start_with(config, inherited)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if let Some(name) = user {
        if let Err(e) = drop_privileges(&daemon, &name) {
            daemon.shutdown(Duration::ZERO).await;
            return Err(anyhow!("cannot switch to user {name:?}: {e:#}; stopping"));
        }
    }
    // After the privilege drop, like the log's thread below: a lane's thread takes the
    // credentials of this one.
    if let Err(e) = spliced::forward::lanes::start() {
        warn!("the bulk transfer lanes did not start ({e}); bulk transfers share the runtime");
    }
    // After the privilege drop: the writer's thread takes the credentials of this one. Dropped
    // at the end of `run`, which writes what is still buffered.
    let _flusher = log
        .start_buffering()
        .inspect_err(|e| warn!("the log's writer thread did not start ({e}); logging line by line"))
        .ok();
    notify(&format!("READY=1\nSTATUS=forwarding {routes} route(s)"));
    loop {
        match (signals.next().await, &path) {
            (Signal::Stop(name), _) => {
                info!("{name}: stopping");
                notify("STOPPING=1");
                break;
            }
            (Signal::Reload, None) => info!("SIGHUP: nothing to reload (no --config file)"),
            (Signal::Reload, Some(path)) => {
                notify(&spliced::systemd::reloading_message());
                let status = match reload(&mut daemon, path).await {
                    Some(g) => {
                        grace = g;
                        "configuration reloaded"
                    }
                    None => "reload failed; running the previous configuration",
                };
                notify(&format!("READY=1\nSTATUS={status}"));
            }
        }
    }
    daemon.shutdown(grace).await;
    Ok(())
}

/// sysexits.h `EX_UNAVAILABLE`: `status` found no daemon to ask.
const EX_UNAVAILABLE: u8 = 69;

/// Prints clap's message. --help and --version exit 0; every command-line error exits 64
/// (EX_USAGE), like an invalid address or configuration, not clap's own status 2.
fn clap_error(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    if e.exit_code() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EX_USAGE as u8)
    }
}

fn usage_errors(errors: &[ConfigError]) -> ExitCode {
    for e in errors {
        eprintln!("error: {e}");
    }
    ExitCode::from(EX_USAGE as u8)
}

/// The daemon's log: to stderr through [`log_writer`], where, once the daemon runs, a
/// connection's lines (and debug and trace lines) may wait up to `log_writer::FLUSH_EVERY` to
/// share a `write`.
fn daemon_log() -> log_writer::LogWriter {
    fn bulk(meta: &tracing::Metadata<'_>) -> bool {
        const PER_CONNECTION: [&str; 3] = [
            "spliced::daemon::connection",
            "spliced::daemon::routing",
            "spliced::daemon::proxied",
        ];
        // Ordered from error (least) to trace (most verbose).
        let level = *meta.level();
        level > tracing::Level::INFO
            || (level == tracing::Level::INFO && PER_CONNECTION.contains(&meta.target()))
    }
    let writer = log_writer::LogWriter::new(std::io::stderr(), bulk);
    init_logging(Some(writer.clone()));
    writer
}

/// `RUST_LOG`-style filtering, `info` by default, to `writer` or else stderr. aya-log records
/// from the eBPF program arrive through the `log` crate and are bridged into the same output.
fn init_logging(writer: Option<log_writer::LogWriter>) {
    use tracing_subscriber::{fmt::writer::BoxMakeWriter, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let writer = match writer {
        Some(w) => BoxMakeWriter::new(w),
        None => BoxMakeWriter::new(std::io::stderr),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_timer(LogTime)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// SIGHUP: re-reads the configuration file and applies it; an invalid file (or one whose new
/// listeners cannot be bound) is logged error by error and the running configuration stays.
/// Returns the new grace period when the reload was applied.
async fn reload(daemon: &mut Daemon, path: &Path) -> Option<Duration> {
    info!("SIGHUP: reloading {}", path.display());
    fn fail(errors: &[impl std::fmt::Display]) {
        for e in errors {
            error!("reload: {e}");
        }
        error!(
            "reload: {} error(s); still running the previous configuration",
            errors.len()
        );
    }
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            fail(&errors);
            return None;
        }
    };
    let grace = config.grace_period;
    match daemon.reload(config).await {
        Ok(s) => {
            info!(
                "reload: configuration applied: {} route(s) added, {} removed, {} changed",
                s.added, s.removed, s.changed
            );
            Some(grace)
        }
        Err(errors) => {
            fail(&errors);
            None
        }
    }
}

/// Switches to `name` once everything privileged is done (see `spliced::privdrop`).
fn drop_privileges(daemon: &Daemon, name: &str) -> Result<()> {
    let user = spliced::privdrop::lookup(name)?;
    daemon
        .hand_over_to(user.uid, user.gid)
        .context("cannot hand the control socket over")?;
    let mut keep = spliced::privdrop::KEEP;
    if (daemon.has_sockmap() || daemon.has_xdp()) && spliced::privdrop::bpf_needs_cap() {
        // This kernel checks CAP_BPF for every bpf() command (before 6.5).
        keep |= 1 << spliced::privdrop::CAP_BPF;
    }
    // A capability the service manager never gave (a unit whose bounding set leaves out
    // CAP_NET_BIND_SERVICE because systemd binds the low ports) cannot be kept: capset fails.
    let status =
        std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    if let Some(creds) = spliced::privdrop::parse_status(&status) {
        keep &= creds.cap_prm;
    }
    spliced::privdrop::drop_to(&user, keep, &tokio::runtime::Handle::current())?;
    info!(
        "running as user {name} (uid {}, gid {}), keeping only {}",
        user.uid,
        user.gid,
        spliced::privdrop::names(keep)
    );
    Ok(())
}

/// Tells the service manager (systemd, `Type=notify`) about a state change, if there is one.
fn notify(state: &str) {
    if let Err(e) = spliced::systemd::notify(state) {
        warn!("cannot notify the service manager ({state:?}): {e}");
    }
}

/// What a signal asks for.
enum Signal {
    Stop(&'static str),
    Reload,
}

/// The signals the daemon acts on, installed once.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for SIGINT, SIGTERM or SIGHUP.
    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.int.recv() => Signal::Stop("SIGINT"),
            _ = self.term.recv() => Signal::Stop("SIGTERM"),
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

/// Each connection holds two sockets (and two pipes on the splice path): lift the soft open-file
/// limit to the hard one so thousands of connections fit.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
