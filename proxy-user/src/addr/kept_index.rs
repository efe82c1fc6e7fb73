//! Interface indexes for dials, kept until the kernel reports a change of any link.
//!
//! A zoned upstream (`[fe80::2%lxdbr0]:80`) needs its interface's index at every dial: one
//! `SIOCGIFINDEX` ioctl, ~1 % of the daemon's CPU per short connection (issue 17's profile).
//! An index changes only when an interface is deleted and created again, and the kernel
//! announces every link change to the `RTMGRP_LINK` netlink group: a task listens there and
//! forgets every kept index at each message, and when its socket overflowed (`ENOBUFS`: some
//! were lost). A dial in the instant between a change and the task's wake-up may still use the
//! old index and fail, as a dial during the change itself would. Outside a tokio runtime, or
//! where the netlink socket cannot be had, every lookup asks the kernel.
use std::{
    collections::BTreeMap,
    os::fd::OwnedFd,
    sync::{
        atomic::{AtomicU8, Ordering},
        Mutex, MutexGuard,
    },
};

use rustix::{
    io::Errno,
    net::{
        bind, netlink::SocketAddrNetlink, recv, socket_with, AddressFamily, RecvFlags, SocketFlags,
        SocketType,
    },
};
use tokio::io::unix::AsyncFd;
use tracing::debug;

use super::{interface_index, AddrError};

/// No task listens (never started, or its runtime ended): look up, keep nothing.
const IDLE: u8 = 0;
/// A task is being started.
const STARTING: u8 = 1;
/// The task listens: kept indexes are current.
const WATCHING: u8 = 2;
/// The netlink socket was refused: look up every time, do not try again.
const UNAVAILABLE: u8 = 3;

struct Kept {
    /// A generation, bumped at every forgetting, and the indexes read in it.
    indexes: Mutex<(u64, BTreeMap<String, u32>)>,
    state: AtomicU8,
}

static KEPT: Kept = Kept {
    indexes: Mutex::new((0, BTreeMap::new())),
    state: AtomicU8::new(IDLE),
};

/// The index of interface `name`, kept from an earlier lookup while no link changed since.
pub fn index(name: &str) -> Result<u32, AddrError> {
    if !watching() {
        return interface_index(name);
    }
    let generation = {
        let kept = lock();
        if let Some(&index) = kept.1.get(name) {
            return Ok(index);
        }
        kept.0
    };
    let index = interface_index(name)?;
    let mut kept = lock();
    // A link changed during the lookup: the index may be the old one; do not keep it.
    if kept.0 == generation {
        kept.1.insert(name.to_owned(), index);
    }
    Ok(index)
}

fn lock() -> MutexGuard<'static, (u64, BTreeMap<String, u32>)> {
    // A panic elsewhere while holding the lock leaves a map that is still whole.
    KEPT.indexes.lock().unwrap_or_else(|e| e.into_inner())
}

fn forget() {
    let mut kept = lock();
    kept.0 += 1;
    kept.1.clear();
}

/// Whether the listening task runs; starts it if none does and a runtime is at hand.
fn watching() -> bool {
    match KEPT.state.load(Ordering::Acquire) {
        WATCHING => return true,
        STARTING | UNAVAILABLE => return false,
        _ => {}
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return false;
    };
    if KEPT
        .state
        .compare_exchange(IDLE, STARTING, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return false;
    }
    let socket = match link_events() {
        Ok(s) => s,
        Err(e) => {
            debug!("interface indexes: no netlink socket ({e}); looked up at every dial");
            KEPT.state.store(UNAVAILABLE, Ordering::Release);
            return false;
        }
    };
    // Whatever was kept before may predate changes nobody listened for.
    forget();
    // Before the spawn: the task may end (and say so) before this thread runs on.
    KEPT.state.store(WATCHING, Ordering::Release);
    runtime.spawn(listen(socket, Gone));
    true
}

/// Marks the listening task gone however it ends, also when its runtime drops it unpolled (an
/// argument of the task's future, dropped with it).
struct Gone;

impl Drop for Gone {
    fn drop(&mut self) {
        KEPT.state.store(IDLE, Ordering::Release);
    }
}

/// A netlink socket bound to the link group, registered with the runtime.
fn link_events() -> std::io::Result<AsyncFd<OwnedFd>> {
    let fd = socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None, // NETLINK_ROUTE
    )?;
    bind(&fd, &SocketAddrNetlink::new(0, libc::RTMGRP_LINK as u32))?;
    // SAFETY: the descriptor is open and owned; nothing replaces or closes it while the
    // AsyncFd holds it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Forgets the kept indexes at every message; ends with the runtime or a socket error.
async fn listen(socket: AsyncFd<OwnedFd>, _gone: Gone) {
    let mut buf = [0u8; 8192];
    loop {
        let Ok(mut ready) = socket.readable().await else {
            return;
        };
        loop {
            match recv(socket.get_ref(), &mut buf, RecvFlags::DONTWAIT) {
                Ok(_) | Err(Errno::NOBUFS) => forget(),
                Err(Errno::AGAIN) => {
                    ready.clear_ready();
                    break;
                }
                Err(Errno::INTR) => {}
                Err(e) => {
                    debug!("interface indexes: netlink socket failed ({e}); no longer kept");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_kept_index_is_the_kernels_and_goes_with_a_link_event() {
        let lo = interface_index("lo").unwrap();
        assert_eq!(index("lo").unwrap(), lo);
        assert!(watching(), "the netlink task runs");
        assert_eq!(lock().1.get("lo"), Some(&lo), "kept after a lookup");
        assert_eq!(index("lo").unwrap(), lo);
        // What the task does at a link message (the messages themselves: the integration test
        // `veth_recreated`, a veth deleted and created again under a running daemon).
        forget();
        assert!(lock().1.is_empty());
        assert!(matches!(
            index("nosuchif0"),
            Err(AddrError::NoInterface { .. })
        ));
        assert!(!lock().1.contains_key("nosuchif0"), "errors are not kept");
    }
}
