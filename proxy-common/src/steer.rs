//! The accept steering program's maps (`proxy-ebpf/src/steer.rs`).

/// Name of the `sk_reuseport` program.
pub const STEER_PROG: &str = "spliced_steer";
/// Name of the REUSEPORT_SOCKARRAY: index `group * STEER_MAX_LANES + lane` -> that lane's
/// listening socket of the group.
pub const STEER_SOCKETS_MAP: &str = "STEER_SOCKETS";
/// Name of the hash map: a port, as the TCP header carries it (`u16` in network order, read as a
/// little- or big-endian `u16` alike on both sides, widened to `u32`) -> the indices of the
/// groups listening on it, each plus one (0: an empty place), [`STEER_PORT_GROUPS`] of them.
pub const STEER_GROUPS_MAP: &str = "STEER_GROUPS";
/// Name of the array the daemon writes through a shared mapping: index `lane` -> connections
/// that lane carries now; [`STEER_LANES_SLOT`] -> the number of lanes; [`STEER_LEAST_SLOT`] ->
/// the least loaded lane.
pub const STEER_LOAD_MAP: &str = "STEER_LOAD";
/// Name of the array of counters: index `lane` -> connections handed to it.
pub const STEER_PICKS_MAP: &str = "STEER_PICKS";

/// The most lanes (cores) steered; a machine with more has its other cores unused by accepts.
pub const STEER_MAX_LANES: u32 = 64;
/// The most steered groups (listening addresses) at once.
pub const STEER_MAX_GROUPS: u32 = 256;
/// The most steered groups on one port (listening on different addresses of it); a group beyond
/// them accepts on one socket.
pub const STEER_PORT_GROUPS: usize = 4;
/// A connection goes to the lane of the core that took its SYN unless that lane carries more
/// than this many connections more than the least loaded lane.
pub const STEER_SLACK: u32 = 2;
/// `STEER_LOAD`'s slot of the number of lanes.
pub const STEER_LANES_SLOT: u32 = STEER_MAX_LANES;
/// `STEER_LOAD`'s slot of the least loaded lane, kept by the daemon at every change of a load.
pub const STEER_LEAST_SLOT: u32 = STEER_MAX_LANES + 1;
/// `STEER_LOAD`'s size.
pub const STEER_LOAD_SLOTS: u32 = STEER_MAX_LANES + 2;
