//! The `spliced` binary: parses the command line, sets up logging, runs the daemon until
//! SIGINT or SIGTERM.
use std::process::ExitCode;

use clap::Parser as _;
use spliced::{
    cli::{Cli, Command},
    config::{Config, ConfigError, DEFAULT_CONTROL_SOCKET, EX_USAGE},
    Daemon,
};
use tracing::{error, info, warn};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(&e),
    };
    init_logging();
    // Kept for SIGHUP.
    let config_path = cli.config.clone();
    let config = match cli.command {
        Some(Command::Check { ref config }) => {
            return match Config::load(config) {
                Ok(c) => {
                    println!("{}: ok, {} route(s)", config.display(), c.routes.len());
                    ExitCode::SUCCESS
                }
                Err(errors) => usage_errors(&errors),
            };
        }
        Some(Command::Status {
            ref socket,
            ref config,
        }) => {
            let path = match (socket, config) {
                (Some(socket), _) => socket.clone(),
                (None, Some(file)) => match Config::load(file) {
                    Ok(c) => c.control_socket,
                    Err(errors) => return usage_errors(&errors),
                },
                (None, None) => DEFAULT_CONTROL_SOCKET.into(),
            };
            return match spliced::control::query(&path) {
                Ok(table) => {
                    print!("{table}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EX_UNAVAILABLE)
                }
            };
        }
        None => match cli.into_config() {
            Ok(c) => c,
            Err(errors) => return usage_errors(&errors),
        },
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
    // Idle blocking-pool threads go after a second: a privilege drop waits for the ones that
    // were started with root's credentials (see privdrop).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_keep_alive(std::time::Duration::from_secs(1))
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let mut grace = config.grace_period;
        // Before anything is bound: a SIGTERM right after the "listening on" line must stop
        // the daemon gracefully, not kill it.
        let mut signals = match Signals::new() {
            Ok(s) => s,
            Err(e) => {
                error!("cannot install the signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let routes = config.routes.len();
        let user = config.user.clone();
        let mut daemon = match Daemon::start_with(config, inherited).await {
            Ok(d) => d,
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(name) = user {
            if let Err(e) = drop_privileges(&daemon, &name) {
                error!("cannot switch to user {name:?}: {e}; stopping");
                daemon.shutdown(std::time::Duration::ZERO).await;
                return ExitCode::FAILURE;
            }
        }
        notify(&format!("READY=1\nSTATUS=forwarding {routes} route(s)"));
        loop {
            match signals.next().await {
                Signal::Stop(name) => {
                    info!("{name}: stopping");
                    notify("STOPPING=1");
                    break;
                }
                Signal::Reload => match &config_path {
                    None => info!("SIGHUP: nothing to reload (no --config file)"),
                    Some(path) => {
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
                },
            }
        }
        daemon.shutdown(grace).await;
        ExitCode::SUCCESS
    })
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

/// `RUST_LOG`-style filtering, `info` by default. aya-log records from the eBPF program arrive
/// through the `log` crate and are bridged into the same output.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// SIGHUP: re-reads the configuration file and applies it; an invalid file (or one whose new
/// listeners cannot be bound) is logged error by error and the running configuration stays.
/// Returns the new grace period when the reload was applied.
async fn reload(daemon: &mut Daemon, path: &std::path::Path) -> Option<std::time::Duration> {
    info!("SIGHUP: reloading {}", path.display());
    let fail = |errors: &[String]| {
        for e in errors {
            error!("reload: {e}");
        }
        error!(
            "reload: {} error(s); still running the previous configuration",
            errors.len()
        );
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            fail(&errors.into_iter().map(|e| e.0).collect::<Vec<_>>());
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
fn drop_privileges(daemon: &Daemon, name: &str) -> Result<(), String> {
    let user = spliced::privdrop::lookup(name)?;
    daemon
        .hand_over_to(user.uid, user.gid)
        .map_err(|e| format!("cannot hand the control socket over: {e}"))?;
    let mut keep = spliced::privdrop::KEEP;
    if daemon.has_sockmap() && spliced::privdrop::bpf_needs_cap() {
        // This kernel checks CAP_BPF for every bpf() command (before 6.5).
        keep |= 1 << spliced::privdrop::CAP_BPF;
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
