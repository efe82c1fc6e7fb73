//! Where `auto` sends a bulk transfer once it leaves the copy path: into sockmap when the bytes
//! it mostly moves go out to a peer on this host (loopback), through splice otherwise.
//!
//! Measured on 2026-11-29 (2-core VM, Linux 6.18, one iperf3 stream each way):
//! - `cargo xtask bench` (5 rounds; client on the host's loopback, upstream behind a veth):
//!   sockmap 17.3 against splice 13.4 Gbit/s where the bytes go out to the loopback client
//!   (download), at 0.624 against 0.994 s of machine CPU per GB; 12.0 against 15.9 where they go
//!   out on the veth (upload), at 0.913 against 0.840 s/GB.
//! - The mirror image by hand (client behind a veth, spliced and the upstream in one namespace,
//!   the upstream on 127.0.0.1; 3 alternating rounds of 4 s): into loopback sockmap 14.2-16.1
//!   against splice 12.2-13.9; out on the veth sockmap 11.8-12.1 against splice 14.4-16.6.
//!
//! So what decides is the device the bytes leave on, not the direction. Into loopback the
//! psock backlog worker's send runs the receiver's TCP inline, once per skb, where splice's
//! daemon does the same work in smaller steps; on a veth the worker's per-skb sends (each
//! segmented to the veth's MTU) are slower than splice's. Other devices (a physical NIC) were
//! not measured here and get splice, the path measured cheaper per GB away from loopback.
use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use super::DataPath;

/// The path for a connection that reached the bulk limit having moved `up` bytes client to
/// upstream and `down` back: sockmap if the side receiving the larger share is a peer on this
/// host (`client` for `down`, `upstream` for `up`, each giving (local, peer) addresses; only
/// that side's are read).
pub fn path(
    up: u64,
    down: u64,
    client: impl FnOnce() -> io::Result<(SocketAddr, SocketAddr)>,
    upstream: impl FnOnce() -> io::Result<(SocketAddr, SocketAddr)>,
) -> DataPath {
    let receiver = if down >= up { client() } else { upstream() };
    match receiver {
        Ok((local, peer)) if on_this_host(local, peer) => DataPath::Sockmap,
        _ => DataPath::Splice,
    }
}

/// Whether a socket's peer is on this host, so its bytes go out on loopback: a loopback
/// address, or the socket's own address (the kernel routes local addresses through `lo`).
fn on_this_host(local: SocketAddr, peer: SocketAddr) -> bool {
    let canonical = |ip: IpAddr| ip.to_canonical();
    let (local, peer) = (canonical(local.ip()), canonical(peer.ip()));
    peer.is_loopback() || peer == local
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(local: &str, peer: &str) -> impl FnOnce() -> io::Result<(SocketAddr, SocketAddr)> {
        let addrs = (local.parse().unwrap(), peer.parse().unwrap());
        move || Ok(addrs)
    }

    #[test]
    fn the_larger_share_going_to_loopback_takes_sockmap() {
        let lo_client = || pair("127.0.0.1:8080", "127.0.0.1:40000");
        let veth_upstream = || pair("[fe80::1%4]:50000", "[fe80::2%4]:7000");
        // Download to a loopback client: sockmap; upload to a veth upstream: splice.
        assert_eq!(
            path(0, 1 << 20, lo_client(), veth_upstream()),
            DataPath::Sockmap
        );
        assert_eq!(
            path(1 << 20, 0, lo_client(), veth_upstream()),
            DataPath::Splice
        );
        // The mirror image: the upstream on loopback, the client across a link.
        let remote_client = || pair("[::ffff:203.0.113.1]:443", "[::ffff:198.51.100.7]:5000");
        let lo_upstream = || pair("[::1]:50000", "[::1]:8080");
        assert_eq!(
            path(1 << 20, 0, remote_client(), lo_upstream()),
            DataPath::Sockmap
        );
        assert_eq!(
            path(0, 1 << 20, remote_client(), lo_upstream()),
            DataPath::Splice
        );
    }

    #[test]
    fn own_addresses_mapped_addresses_and_errors() {
        // A client on this host dialing one of its own addresses: same address both ends.
        let own = pair("[::ffff:198.51.100.1]:443", "198.51.100.1:40000");
        assert_eq!(
            path(0, 1, own, pair("[::1]:1", "[::1]:2")),
            DataPath::Sockmap
        );
        // An IPv4-mapped loopback peer.
        let mapped = pair("[::ffff:127.0.0.1]:443", "[::ffff:127.0.0.1]:40000");
        assert_eq!(
            path(0, 1, mapped, || Err(io::Error::other("x"))),
            DataPath::Sockmap
        );
        // Addresses that cannot be read: splice, which works everywhere.
        let err = || || Err(io::Error::other("gone"));
        assert_eq!(path(0, 1, err(), err()), DataPath::Splice);
    }
}
