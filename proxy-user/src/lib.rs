//! spliced: a TCP forwarder that splices connections inside the kernel with sockmap.
//!
//! Modules, from the top down (each imports only ones below it):
//! - [`daemon`]: listeners, accept loops, connections, reload and shutdown;
//! - [`forward`]: the three data paths and the choice between them; [`registry`]: live
//!   connections and per-route counters, read by [`status`] (`spliced status`) and `metrics`;
//! - `ebpf`: the verdict program, its maps, the start-up probe; [`config`]: the TOML file;
//!   [`privdrop`], [`systemd`], [`log_writer`], [`log_time`]: the process's environment;
//! - [`addr`], `sockopt`: addresses and socket options.
pub mod addr;
pub mod cli;
pub mod config;
pub mod daemon;
mod ebpf;
pub mod forward;
pub mod log_time;
pub mod log_writer;
mod metrics;
pub mod peek;
pub mod privdrop;
pub mod problem;
pub mod proxy_header;
pub mod registry;
mod sockopt;
pub mod status;
pub mod steer;
pub mod systemd;
mod text;
pub mod upstream;
pub mod xdp;

pub use config::{Config, Mode, Route};
pub use daemon::{Daemon, StartError};
pub use forward::DataPath;

/// The embedded eBPF object; empty when built without the eBPF toolchain.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// The embedded XDP front object (`proxy-ebpf/src/xdp.rs`); empty when built without the eBPF
/// toolchain.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-xdp"));

/// The embedded accept steering object (`proxy-ebpf/src/steer.rs`); empty when built without
/// the eBPF toolchain.
pub static STEER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-steer"));
