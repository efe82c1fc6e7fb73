//! Development commands for spliced: `cargo xtask <command>`.
//!
//! - `setup`: install what is missing (nightly `rust-src`, `bpf-linker`, Debian packages);
//! - `build [--release]`: build `spliced` with its eBPF object and print the binary's path;
//! - `run [--release] -- ARGS`: build, then exec `spliced ARGS` as root;
//! - `test [ARGS]`: every check and test (what CI runs);
//! - `demo`: a link-local HTTP upstream in a namespace, spliced in front of it, a curl through it;
//! - `bench [--quick] [--output FILE]`: spliced against direct, socat, HAProxy and
//!   systemd-socket-proxyd; writes docs/benchmarks.md and docs/benchmarks.svg.
mod bench;
mod build;
mod demo;
mod run;
mod setup;
mod test;
mod util;

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Development commands for spliced")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build, the tests and the demo need; quick when everything is there.
    Setup,
    /// Build spliced (with its eBPF object) and print the binary's path.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build spliced and run it as root with ARGS (exec: Ctrl-C and the exit status reach it).
    Run {
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run every check and test: setup, fmt, clippy (host and eBPF), build, cargo test.
    Test {
        /// Passed on to `cargo test` (a filter, or `-- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Show spliced forwarding to a link-local HTTP server in a namespace, until Ctrl-C.
    Demo,
    /// Benchmark spliced against direct, socat, HAProxy and systemd-socket-proxyd.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Build { release } => build::command(release),
        Command::Run { release, args } => run::command(release, args),
        Command::Test { args } => test::command(args),
        Command::Demo => demo::command(),
        Command::Bench(args) => bench::command(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
