//! Which XDP programs an interface already carries: one RTM_GETLINK request, read for its
//! IFLA_XDP attributes. Hand-written (about 60 lines) because aya 0.14 has no XDP query and a
//! netlink crate would add a dependency tree for this one request.
use std::{io, mem::size_of, os::fd::FromRawFd, os::fd::OwnedFd};

use std::os::fd::AsRawFd;

const IFLA_XDP: u16 = 43;
/// Nested in IFLA_XDP: the program ids of the generic, native and offloaded slots (4.19), and
/// the single-program id older kernels report.
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
const IFLA_XDP_HW_PROG_ID: u16 = 7;
const NLA_HDRLEN: usize = 4;

/// The ids of the XDP programs attached to interface `ifindex` (any mode), deduplicated.
pub fn attached_programs(ifindex: u32) -> io::Result<Vec<u32>> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let hdr = size_of::<libc::nlmsghdr>();
    let len = hdr + size_of::<libc::ifinfomsg>();
    let mut req = vec![0u8; len];
    req[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // ifinfomsg: family (1), pad (1), type (2), index (4), flags, change.
    req[hdr + 4..hdr + 8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    // SAFETY: sending our own buffer on our socket (the kernel is the default peer).
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: receiving into our own buffer of that length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_reply(&buf[..n as usize])
}

/// The program ids in one RTM_NEWLINK reply (or the error of an NLMSG_ERROR).
fn parse_reply(msg: &[u8]) -> io::Result<Vec<u32>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "short netlink reply");
    let hdr = size_of::<libc::nlmsghdr>();
    let kind = u16::from_ne_bytes(
        msg.get(4..6)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    if i32::from(kind) == libc::NLMSG_ERROR {
        let errno = i32::from_ne_bytes(
            msg.get(hdr..hdr + 4)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        );
        return Err(io::Error::from_raw_os_error(-errno));
    }
    let attrs = msg
        .get(hdr + size_of::<libc::ifinfomsg>()..)
        .ok_or_else(bad)?;
    let mut ids = Vec::new();
    for (kind, payload) in attributes(attrs) {
        if kind == IFLA_XDP {
            for (kind, value) in attributes(payload) {
                let is_id = matches!(
                    kind,
                    IFLA_XDP_PROG_ID
                        | IFLA_XDP_DRV_PROG_ID
                        | IFLA_XDP_SKB_PROG_ID
                        | IFLA_XDP_HW_PROG_ID
                );
                if let (true, Some(v)) = (is_id, value.get(..4)) {
                    let id = u32::from_ne_bytes(v.try_into().map_err(|_| bad())?);
                    if id != 0 && !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
        }
    }
    Ok(ids)
}

/// (type, payload) of each netlink attribute in `buf` (type without the NESTED flag).
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes(buf.get(0..2)?.try_into().ok()?));
        let kind = u16::from_ne_bytes(buf.get(2..4)?.try_into().ok()?) & 0x3fff;
        let payload = buf.get(NLA_HDRLEN..len)?;
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some((kind, payload))
    })
}
