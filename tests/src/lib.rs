//! spliced's integration-test harness: real kernel, real sockets, real network namespaces.
//!
//! - [`Topology`] (`netns`): a network namespace of its own joined to the host by a veth pair,
//!   with link-local addresses only (`fe80::1` on the host side, `fe80::2` inside), removed on
//!   drop, also when the test panics. Names are unique per process and counter
//!   (`spl-<pid>-<n>`), so tests run in parallel; `cargo xtask test` removes those left by a
//!   killed run.
//! - [`Spliced`] (`daemon`): the real `spliced` binary (`SPLICED_BIN`, set by `cargo xtask
//!   test`), started with given arguments, its log captured, stopped on drop; the
//!   "connection closed" lines parsed ([`fields`], [`Spliced::assert_closed`]).
//! - [`Forward`], [`Configured`] (`forward`): a namespace with an upstream listener, and a
//!   daemon with one route to it from the command line, or from a configuration file.
//! - [`Process`], [`run`] (`process`): other child processes, and commands run to completion.
//! - `sockets`: bounded connect and accept, exchanges that assert what arrives ([`carry`],
//!   [`exchange`]), how a connection ends ([`closed_within`]), socket options through
//!   `socket2` ([`set_linger_zero`], [`sndbuf`]) and queue sizes ([`inq`], [`outq`]).
//! - [`Payload`] (`payload`): a deterministic byte stream and its SHA-256, for comparing both
//!   ends.
//! - [`TempDir`], [`TempConfig`] (`temp`): configuration files and a control socket;
//!   `metrics`: the Prometheus endpoint ([`scrape`], [`wait_metric`]).
//! - [`Lab`] (`lab`): several namespaces of the test's own joined by veths (client, front
//!   proxy, spliced, upstreams each in its own), processes started inside them.
//! - `xdp_net`: two namespaces joined by a veth (a [`Lab`] of two) and hand-made frames, for
//!   the XDP front.
//! - [`per_mode!`]: one `#[test]` per data path; [`wait_until`]: a bounded poll.
//!
//! Every wait is bounded: sockets get read/write timeouts, polls have a deadline.
mod daemon;
mod forward;
mod lab;
mod metrics;
mod netns;
mod payload;
mod process;
mod sockets;
mod temp;
pub mod xdp_net;

pub use daemon::*;
pub use forward::*;
pub use lab::*;
pub use metrics::*;
pub use netns::*;
pub use payload::*;
pub use process::*;
pub use sockets::*;
pub use temp::*;

use std::{
    thread,
    time::{Duration, Instant},
};

/// The data paths the suite runs against.
pub const MODES: [&str; 3] = ["sockmap", "splice", "copy"];

/// `default` bytes, or `SPLICED_TEST_BULK_MIB` MiB when that is set: `cargo xtask
/// integration-test vm` scales bulk transfers down, QEMU without KVM being far slower.
pub fn bulk_bytes(default: u64) -> u64 {
    match std::env::var("SPLICED_TEST_BULK_MIB") {
        Ok(v) => {
            let mib: u64 = v
                .parse()
                .unwrap_or_else(|_| panic!("SPLICED_TEST_BULK_MIB={v:?} is not a number"));
            mib << 20
        }
        Err(_) => default,
    }
}

/// Calls `probe` every `every` until it returns `Some`, and returns that. After `limit` it panics
/// with the text of `failure` (called only then, so it can show the latest state).
pub fn wait_until<T>(
    limit: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
    failure: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("{}", failure());
        }
        thread::sleep(every);
    }
}

/// Whether a missing eBPF capability must fail the test (CI, or `cargo xtask test`).
pub fn ebpf_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("SPLICED_REQUIRE_EBPF").is_ok_and(|v| v == "1")
}

/// Whether a route must accept on the lanes (steered) where there is more than one core: where
/// eBPF is required, and in the VM suite (`SPLICED_TEST_REQUIRE_STEER=1`), whose kernels all
/// have what the steering needs (5.5) even where the sockmap probe fails.
pub fn steer_required() -> bool {
    ebpf_required() || std::env::var("SPLICED_TEST_REQUIRE_STEER").is_ok_and(|v| v == "1")
}

/// The value in KiB of `key` (with its colon: `"MemAvailable:"`) in a /proc/meminfo or
/// /proc/PID/status text.
pub fn meminfo_kib(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} missing"))
}

/// MemAvailable from /proc/meminfo, in bytes.
pub fn mem_available() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    meminfo_kib(&text, "MemAvailable:") * 1024
}

/// Defines one `#[test]` per data path calling `$body(mode)`: `per_mode!(name, body);` for
/// sockmap, splice and copy; `per_mode!(name, body, and_auto);` adds `auto`, which starts
/// connections on the copy path and moves them on after 256 KiB (to splice), 32 turns of the
/// talk or 100 ms (to sockmap where it works; splice otherwise); `per_mode!(name, body,
/// [sockmap, splice]);` names the paths.
#[macro_export]
macro_rules! per_mode {
    (@tests $name:ident, $body:path, $($mode:ident)+) => {
        mod $name {
            $(
                #[test]
                fn $mode() {
                    $body(stringify!($mode))
                }
            )+
        }
    };
    ($name:ident, $body:path, [$($mode:ident),+]) => {
        $crate::per_mode!(@tests $name, $body, $($mode)+);
    };
    ($name:ident, $body:path, and_auto) => {
        $crate::per_mode!(@tests $name, $body, sockmap splice copy auto);
    };
    ($name:ident, $body:path) => {
        $crate::per_mode!(@tests $name, $body, sockmap splice copy);
    };
}
