//! Interfaces by name and index, looked up at every use (a re-created interface has a new
//! index; a dial's lookup is kept while no link changes, `kept_index`), by the `SIOCGIFINDEX`
//! / `SIOCGIFNAME` ioctls (rustix's `netdevice`) on one socket kept for the purpose. libc's
//! if_nametoindex opens and closes a socket for each lookup: with a zoned upstream that was
//! three system calls and a socket's set-up and teardown per dial (issue 17's profile), now one
//! ioctl. The socket belongs to the namespace spliced started in, the one its dials use.
use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::OnceLock,
};

use rustix::net::{netdevice, socket_with, AddressFamily, SocketFlags, SocketType};

use super::{AddrError, MAX_INTERFACE_NAME};

/// The socket the interface ioctls go through, opened at the first lookup.
static IOCTL_SOCKET: OnceLock<OwnedFd> = OnceLock::new();

/// The kept socket, opened now if it is not yet (an error, e.g. out of descriptors, is
/// returned and the next lookup tries again).
fn ioctl_socket() -> io::Result<&'static OwnedFd> {
    if let Some(fd) = IOCTL_SOCKET.get() {
        return Ok(fd);
    }
    // Any socket will do for these ioctls (netdevice(7)); a Unix datagram socket has no port.
    let fd = socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    Ok(IOCTL_SOCKET.get_or_init(|| fd))
}

/// The current index of the interface `name` (`SIOCGIFINDEX`).
///
/// The index changes when an interface is deleted and created again, so look it up at every
/// use.
pub fn interface_index(name: &str) -> Result<u32, AddrError> {
    // Also refuses a NUL byte (a control character).
    validate_interface_name(name)?;
    let lookup = ioctl_socket().and_then(|fd| Ok(netdevice::name_to_index(fd.as_fd(), name)?));
    match lookup {
        Ok(index) => Ok(index),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Err(AddrError::NoInterface {
            name: name.to_owned(),
        }),
        // Out of descriptors (opening the socket) is not "no such interface".
        Err(source) => Err(AddrError::InterfaceLookup {
            name: name.to_owned(),
            source,
        }),
    }
}

/// Whether an interface called `name` exists right now.
pub fn interface_exists(name: &str) -> bool {
    interface_index(name).is_ok()
}

/// The name of the interface with index `index`, if there is one (`SIOCGIFNAME`).
pub fn interface_name(index: u32) -> Option<String> {
    netdevice::index_to_name(ioctl_socket().ok()?.as_fd(), index).ok()
}

/// Checks `name` the way the kernel's `dev_valid_name` does: 1 to 15 bytes, no '/', ':' or
/// whitespace, and not "." or "..".
pub fn validate_interface_name(name: &str) -> Result<(), AddrError> {
    if name.is_empty() {
        return Err(AddrError::Invalid(
            "the interface name is empty; name an interface, e.g. \"eth0\" (ip link lists them)"
                .to_owned(),
        ));
    }
    if name.len() > MAX_INTERFACE_NAME {
        return Err(AddrError::Invalid(format!(
            "interface name {name:?} is {} bytes long; Linux interface names have at most {} \
             (ip link lists them)",
            name.len(),
            MAX_INTERFACE_NAME
        )));
    }
    if name == "." || name == ".." {
        return Err(AddrError::Invalid(format!(
            "{name:?} is not a valid interface name; name an interface, e.g. \"eth0\""
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|&c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(AddrError::Invalid(format!(
            "interface name {name:?} contains {c:?}, which Linux interface names cannot \
             contain (ip link lists the interfaces)"
        )));
    }
    Ok(())
}
