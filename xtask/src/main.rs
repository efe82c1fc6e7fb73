//! Development commands for spliced: `cargo xtask <command>`.
//!
//! - `setup`: install what is missing (nightly `rust-src`, `bpf-linker`, Debian packages);
//! - `build [--release]`: build `spliced` with its eBPF object and print the binary's path;
//! - `run [--release] -- ARGS`: build, then exec `spliced ARGS` as root;
//! - `test [ARGS]`: every check and test (what CI runs);
//! - `integration-test local [ARGS]`: the integration suite on the host kernel;
//! - `integration-test vm [--arch amd64|arm64] [--kernel VERSION ...]`: the suite in QEMU on
//!   Debian cloud kernels;
//! - `deb [--arch amd64|arm64] [--output DIR]`: reproducible Debian packages (stripped binary,
//!   systemd unit, example configuration, man page; debug info in `spliced-dbgsym`);
//! - `system-test [--arch amd64|arm64]`: the package installed in a Debian guest under systemd;
//! - `demo`: a link-local HTTP upstream in a namespace, spliced in front of it, a curl through it;
//! - `bench [--quick] [--output FILE] [--perf DIR]`: spliced against direct, socat, HAProxy and
//!   systemd-socket-proxyd; writes docs/benchmarks.md and docs/benchmarks.svg (and, with
//!   `--perf`, perf profiles of each case into DIR).
mod arch;
mod bench;
mod build;
mod deb;
mod demo;
mod disk;
mod fuzz;
mod repro;
mod run;
mod setup;
mod system;
mod test;
mod util;
mod vm;

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
    /// Run the integration suite on the host kernel (`local`) or in QEMU on other kernels (`vm`).
    IntegrationTest {
        #[command(subcommand)]
        on: Where,
    },
    /// Build a Debian package of spliced (binary, unit, example configuration, man page).
    Deb {
        /// The architecture to build for (arm64 is cross-built).
        #[arg(long, value_enum, default_value = "amd64")]
        arch: arch::Arch,
        /// Where to write the .deb files (default: target/deb).
        #[arg(long, value_name = "DIR")]
        output: Option<std::path::PathBuf>,
    },
    /// Install the package in a Debian guest with systemd as PID 1 (QEMU, TCG) and check the
    /// service from inside: enable, reload, hardening, socket activation, journal, stop, purge.
    SystemTest(system::Args),
    /// Show spliced forwarding to a link-local HTTP server in a namespace, until Ctrl-C.
    Demo,
    /// Run the cargo-fuzz targets in fuzz/ from their checked-in corpora (nightly).
    Fuzz {
        /// The targets to run (default: every target in fuzz/Cargo.toml).
        targets: Vec<String>,
        /// How long to run each target.
        #[arg(long, default_value_t = fuzz::CI_SECONDS)]
        seconds: u64,
    },
    /// Benchmark spliced against direct, socat, HAProxy and systemd-socket-proxyd.
    Bench(bench::Args),
}

#[derive(Subcommand)]
enum Where {
    /// The integration tests (tests/) on the host kernel, as root.
    Local {
        /// Passed on to `cargo test` (a filter, or `-- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// A subset of the integration tests in QEMU (TCG) on Debian cloud kernels; one table row
    /// per kernel. Fails if any kernel fails.
    Vm {
        /// A kernel series: 5.10, 6.1, 6.12, 7 (the newest of that series). Repeatable; default:
        /// all of them.
        #[arg(long = "kernel", value_name = "VERSION")]
        kernels: Vec<String>,
        /// Run only the tests whose names contain FILTER (repeatable), instead of the VM subset.
        /// `SPLICED_TEST_LOG` (the daemons' `RUST_LOG`) is passed on to the guest.
        #[arg(long = "test", value_name = "FILTER")]
        filters: Vec<String>,
        /// The guests' architecture (arm64: qemu-system-aarch64, `virt` machine).
        #[arg(long, value_enum, default_value = "amd64")]
        arch: arch::Arch,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Build { release } => build::command(release),
        Command::Run { release, args } => run::command(release, args),
        Command::Test { args } => test::command(args),
        Command::IntegrationTest {
            on: Where::Local { args },
        } => test::local(args),
        Command::IntegrationTest {
            on:
                Where::Vm {
                    kernels,
                    filters,
                    arch,
                },
        } => test::vm(arch, kernels, filters),
        Command::Deb { arch, output } => deb::command(arch, output),
        Command::SystemTest(args) => system::command(args),
        Command::Demo => demo::command(),
        Command::Fuzz { targets, seconds } => fuzz::command(targets, seconds),
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
