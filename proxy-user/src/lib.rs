//! spliced: a TCP forwarder that splices connections inside the kernel with sockmap.
pub mod addr;
pub mod cli;
pub mod config;
pub mod control;
mod forward;
mod metrics;
pub mod peek;
pub mod privdrop;
pub mod proxy_header;
mod registry;
mod server;
mod sockmap;
mod sockopt;
pub mod systemd;
pub mod upstream;
mod watch;
pub mod xdp;

pub use config::{Config, Mode, Route};
pub use server::{Daemon, DataPath, StartError, Stats};

/// The embedded eBPF object; empty when built without the eBPF toolchain.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// The embedded XDP front object (`proxy-ebpf/src/xdp.rs`); empty when built without the eBPF
/// toolchain.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-xdp"));
