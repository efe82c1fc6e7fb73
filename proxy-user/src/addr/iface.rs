//! Interfaces by name and index, looked up at every use (a re-created interface has a new
//! index). libc's if_nametoindex and if_indextoname are kept: rustix's equivalents need a socket
//! of their own and are no shorter.
use std::ffi::{CStr, CString};

use super::{AddrError, MAX_INTERFACE_NAME};

/// The current index of the interface `name`, by `if_nametoindex(3)`.
///
/// The index changes when an interface is deleted and created again, so look it up at every
/// use.
pub fn interface_index(name: &str) -> Result<u32, AddrError> {
    validate_interface_name(name)?;
    let c_name = CString::new(name).map_err(|_| {
        AddrError::Invalid(format!(
            "interface name {name:?} contains a NUL byte; remove it"
        ))
    })?;
    // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        // if_nametoindex opens a socket for its ioctl: out of descriptors is not "no such
        // interface".
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENODEV) {
            return Err(AddrError::InterfaceLookup {
                name: name.to_owned(),
                source: e,
            });
        }
        return Err(AddrError::NoInterface {
            name: name.to_owned(),
        });
    }
    Ok(index)
}

/// Whether an interface called `name` exists right now.
pub fn interface_exists(name: &str) -> bool {
    interface_index(name).is_ok()
}

/// The name of the interface with index `index`, if there is one, by `if_indextoname(3)`.
pub fn interface_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write.
    let ret = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if ret.is_null() {
        return None;
    }
    // SAFETY: on success if_indextoname wrote a NUL-terminated name into `buf`.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
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
