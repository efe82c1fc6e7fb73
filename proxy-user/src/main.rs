//! The `spliced` binary: parses the command line, sets up logging, runs the daemon until
//! SIGINT or SIGTERM.
use std::process::ExitCode;

use clap::Parser as _;
use spliced::{
    cli::{Cli, Command},
    config::{Config, ConfigError, EX_USAGE},
    Daemon,
};
use tracing::{error, info};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(&e),
    };
    init_logging();
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
        None => match cli.into_config() {
            Ok(c) => c,
            Err(errors) => return usage_errors(&errors),
        },
    };
    raise_fd_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let grace = config.grace_period;
        let daemon = match Daemon::start(config).await {
            Ok(d) => d,
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        match stop_signal().await {
            Ok(name) => info!("{name}: stopping"),
            Err(e) => error!("cannot wait for signals: {e}; stopping"),
        }
        daemon.shutdown(grace).await;
        ExitCode::SUCCESS
    })
}

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

async fn stop_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    })
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
