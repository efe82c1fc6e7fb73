//! Namespaces, veths and hand-made packets for the XDP front's tests.
//!
//! Two namespaces of the test's own (a [`Lab`]: the server, spliced's side, and the clients),
//! joined by a veth pair `vs`/`vc`. Addresses only from the
//! documentation ranges: 198.51.100.0/25, 203.0.113.0/25 and
//! 2001:db8:15::/64. Tagged frames are made by hand (AF_PACKET): the kernels here may have no
//! 8021q, and the XDP program sees the frame before any VLAN device would.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    time::Duration,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{run_in_netns, sh, Lab};

/// Whether this run must have XDP (CI or `cargo xtask test`): then a missing privilege fails
/// the test instead of skipping it.
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("SPLICED_REQUIRE_EBPF").is_ok_and(|v| v == "1")
}

/// Whether the test can run here (root); prints why not when it cannot.
pub fn can_run() -> bool {
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && !required() {
        eprintln!("skipped: the XDP front tests need root (they make namespaces)");
    }
    root || required()
}

/// The two namespaces and the veth between them; removed on drop (the lab's), also on panic.
pub struct Net {
    pub server: String,
    pub client: String,
    _lab: Lab,
}

pub const S4: &str = "198.51.100.1";
pub const ALLOWED4: &str = "198.51.100.10";
pub const DENIED4: &str = "198.51.100.66";
pub const S4_OTHER: &str = "203.0.113.1";
pub const OUTSIDE4: &str = "203.0.113.10";
pub const S6: &str = "2001:db8:15::1";
pub const ALLOWED6: &str = "2001:db8:15::10";
pub const DENIED6: &str = "2001:db8:15::66";

impl Net {
    pub fn new() -> Net {
        let lab = Lab::new(2);
        lab.link(
            (
                0,
                "vs",
                &["198.51.100.1/25", "203.0.113.1/25", "2001:db8:15::1/64"],
            ),
            (
                1,
                "vc",
                &[
                    "198.51.100.10/25",
                    "198.51.100.66/25",
                    "203.0.113.10/25",
                    "2001:db8:15::10/64",
                    "2001:db8:15::66/64",
                ],
            ),
        );
        Net {
            server: lab.ns(0).to_owned(),
            client: lab.ns(1).to_owned(),
            _lab: lab,
        }
    }

    /// Runs `f` on a thread inside namespace `ns`; sockets made there stay in it.
    pub fn run_in<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in_netns(ns, f)
    }

    /// Counters of namespace `ns` by their `nstat` names (`TcpPassiveOpens`,
    /// `TcpExtListenDrops`, `Ip6ReasmReqds`), read where nstat reads them: /proc/net/snmp,
    /// netstat and snmp6 (nstat itself is not in the VM guests).
    pub fn counters(ns: &str, names: &[&str]) -> Vec<u64> {
        let all = Net::run_in(ns, || {
            let read = |f: &str| {
                std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
                    .unwrap_or_else(|e| panic!("/proc/thread-self/net/{f}: {e}"))
            };
            let mut all = std::collections::HashMap::new();
            for file in ["snmp", "netstat"] {
                let text = read(file);
                let lines: Vec<&str> = text.lines().collect();
                for pair in lines.chunks(2) {
                    let [head, values] = pair else { continue };
                    let mut head = head.split_whitespace();
                    let prefix = head.next().unwrap_or("").trim_end_matches(':');
                    for (name, v) in head.zip(values.split_whitespace().skip(1)) {
                        all.insert(format!("{prefix}{name}"), v.parse::<i64>().unwrap_or(0));
                    }
                }
            }
            for line in read("snmp6").lines() {
                let mut f = line.split_whitespace();
                if let (Some(name), Some(v)) = (f.next(), f.next()) {
                    all.insert(name.to_owned(), v.parse().unwrap_or(0));
                }
            }
            all
        });
        names
            .iter()
            .map(|n| *all.get(*n).unwrap_or_else(|| panic!("no counter {n}")) as u64)
            .collect()
    }

    /// The MAC address of `dev` in `ns`.
    pub fn mac(ns: &str, dev: &str) -> [u8; 6] {
        let out = sh(&["ip", "-n", ns, "link", "show", dev]);
        let text = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .expect("link/ether in ip link output");
        let mut mac = [0u8; 6];
        for (m, part) in mac.iter_mut().zip(text.split(':')) {
            *m = u8::from_str_radix(part, 16).expect("hex MAC");
        }
        mac
    }
}

impl Default for Net {
    fn default() -> Net {
        Net::new()
    }
}

/// A TCP connect from `source` to `dest` with a deadline: Ok when it connects, the error
/// otherwise (a dropped SYN ends in `TimedOut`).
pub fn connect_from(source: &str, dest: SocketAddr, limit: Duration) -> io::Result<Socket> {
    let source: IpAddr = source.parse().expect("source address");
    let domain = if source.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SocketAddr::new(source, 0).into())?;
    s.connect_timeout(&dest.into(), limit)?;
    Ok(s)
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A 20-byte TCP SYN with its checksum over `pseudo` (the pseudo-header).
fn tcp_syn(sport: u16, dport: u16, seq: u32, pseudo: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let sum = checksum(&[pseudo, &t]);
    t[16..18].copy_from_slice(&sum.to_be_bytes());
    t
}

/// A TCP SYN segment (no IP header) from `src` to `dst`, for a raw IPv4 socket.
pub fn syn4_segment(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32) -> Vec<u8> {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    tcp_syn(sport, dport, seq, &pseudo)
}

/// An IPv4 packet: header with `options` (a multiple of 4 bytes) and the fragment field
/// `frag` (flags and offset), then `payload`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, options: &[u8], frag: u16, payload: &[u8]) -> Vec<u8> {
    let hlen = 20 + options.len();
    let mut h = vec![0u8; hlen];
    h[0] = 0x40 | (hlen / 4) as u8;
    h[2..4].copy_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x1515u16.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = 6;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    h[20..].copy_from_slice(options);
    let sum = checksum(&[&h]);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 packet carrying a TCP SYN, with a hop-by-hop header (PadN) when `hop_by_hop`.
pub fn ipv6_syn(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, hop_by_hop: bool) -> Vec<u8> {
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, 6]);
    let tcp = tcp_syn(sport, dport, 1, &pseudo);
    let mut ext = Vec::new();
    if hop_by_hop {
        // Next header TCP, length 0 (8 bytes), one PadN option of 4 bytes of padding.
        ext.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
    }
    ipv6(src, dst, if hop_by_hop { 0 } else { 6 }, &[&ext, &tcp])
}

/// An IPv6 header with `next` followed by `parts`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    for p in parts {
        h.extend_from_slice(p);
    }
    h
}

/// An Ethernet frame with VLAN tags `vlans` (outermost first: (TPID, VLAN id)).
pub fn frame(
    dst: [u8; 6],
    src: [u8; 6],
    vlans: &[(u16, u16)],
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for (tpid, vid) in vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Sends whole Ethernet frames out of `dev` of namespace `ns` (AF_PACKET).
pub fn send_frames(ns: &str, dev: &str, frames: Vec<Vec<u8>>) {
    let dev = dev.to_owned();
    Net::run_in(ns, move || {
        let c = std::ffi::CString::new(dev).expect("name");
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        assert_ne!(ifindex, 0, "no such interface");
        // SAFETY: socket(2); the descriptor is owned by `sock` at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        for f in frames {
            to.sll_addr[..6].copy_from_slice(&f[..6]);
            // SAFETY: our buffer and address, with their lengths.
            let n = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&to as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(
                n,
                f.len() as isize,
                "sendto: {}",
                io::Error::last_os_error()
            );
        }
    });
}

/// A raw IPv4 TCP socket bound to `source` (the kernel writes the IP header).
pub fn raw_tcp4(source: Ipv4Addr) -> Socket {
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)).expect("raw socket");
    s.bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(source), 0)))
        .expect("bind raw socket");
    s
}
