//! EOF and error notifications for sockets on the sockmap path.
//!
//! Those sockets are not registered with tokio: the kernel wakes `EPOLLIN` waiters after every
//! verdict batch although nothing is readable (sockmap.md, trap 7: 8,880 wakeups for 1 GiB).
//! Instead one epoll set holds them with `EPOLLRDHUP | EPOLLET` only: a wakeup that carries just
//! the data-ready key is filtered out by epoll, while a FIN (trap 5: the verdict does not forward
//! it, userspace must), an RST or an error still reports. The epoll fd itself is registered with
//! tokio, and a dispatcher task wakes the connection a socket belongs to.
use std::{
    collections::HashMap,
    io,
    mem::MaybeUninit,
    os::fd::{BorrowedFd, OwnedFd, RawFd},
    sync::{Arc, Mutex},
};

use rustix::{
    event::epoll::{self, EventData, EventFlags},
    time::Timespec,
};
use tokio::{io::unix::AsyncFd, sync::Notify, task::JoinHandle};

type Waiters = Arc<Mutex<HashMap<u64, Arc<Notify>>>>;

/// The shared epoll set and its dispatcher task. Sockets are registered under their socket
/// cookie, so the verdict's pressure reports (keyed by cookie) wake the same connection.
pub struct Watcher {
    epoll: Arc<AsyncFd<OwnedFd>>,
    waiters: Waiters,
    dispatcher: JoinHandle<()>,
}

/// A connection's registration: its sockets stay in the epoll set until this is dropped, which
/// must happen before the sockets are closed.
pub struct Watch {
    epoll: Arc<AsyncFd<OwnedFd>>,
    waiters: Waiters,
    cookies: Vec<u64>,
    fds: Vec<RawFd>,
    notify: Arc<Notify>,
}

impl Watcher {
    /// Creates the epoll set. Must be called inside a tokio runtime.
    pub fn new() -> io::Result<Watcher> {
        let fd = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        // SAFETY: `fd` is a fresh descriptor nobody else owns; the OwnedFd keeps it open for
        // as long as the AsyncFd lives.
        let epoll = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        let epoll = Arc::new(epoll);
        let waiters: Waiters = Arc::default();
        let dispatcher = tokio::spawn(dispatch(epoll.clone(), waiters.clone()));
        Ok(Watcher {
            epoll,
            waiters,
            dispatcher,
        })
    }

    /// Registers the sockets of one connection, given as `(fd, cookie)`, for FIN, RST and error
    /// notifications, and for [`Watcher::notify`] with their cookies.
    pub fn watch(&self, sockets: &[(RawFd, u64)]) -> io::Result<Watch> {
        let notify = Arc::new(Notify::new());
        let mut watch = Watch {
            epoll: self.epoll.clone(),
            waiters: self.waiters.clone(),
            cookies: Vec::with_capacity(sockets.len()),
            fds: Vec::with_capacity(sockets.len()),
            notify,
        };
        for &(fd, cookie) in sockets {
            lock(&self.waiters).insert(cookie, watch.notify.clone());
            watch.cookies.push(cookie);
            // SAFETY: the caller's socket is open for this call; epoll keeps no reference to
            // the descriptor, only to the socket. EPOLLERR and EPOLLHUP are always reported.
            let socket = unsafe { BorrowedFd::borrow_raw(fd) };
            let flags = EventFlags::RDHUP | EventFlags::ET;
            epoll::add(
                self.epoll.get_ref(),
                socket,
                EventData::new_u64(cookie),
                flags,
            )?;
            watch.fds.push(fd);
        }
        Ok(watch)
    }
}

impl Watcher {
    /// Wakes the connection that socket `cookie` belongs to, if it is watched.
    pub fn notify(&self, cookie: u64) {
        if let Some(n) = lock(&self.waiters).get(&cookie) {
            n.notify_one();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

impl Watch {
    /// Waits until one of the sockets may have changed state (FIN, RST, error). A notification
    /// that came before the call is not lost.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        for &fd in &self.fds {
            // SAFETY: the fds are still open (see the type's doc).
            let socket = unsafe { BorrowedFd::borrow_raw(fd) };
            // A failure only means the kernel already dropped the registration.
            let _ = epoll::delete(self.epoll.get_ref(), socket);
        }
        let mut waiters = lock(&self.waiters);
        for cookie in &self.cookies {
            waiters.remove(cookie);
        }
    }
}

fn lock(waiters: &Waiters) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Notify>>> {
    waiters.lock().unwrap_or_else(|e| e.into_inner())
}

async fn dispatch(epoll: Arc<AsyncFd<OwnedFd>>, waiters: Waiters) {
    loop {
        let Ok(mut guard) = epoll.readable().await else {
            return;
        };
        while drain(epoll.get_ref(), &waiters) {}
        guard.clear_ready();
    }
}

/// Wakes the connections of up to one batch of ready sockets; whether the batch was full (more
/// may be ready).
fn drain(epoll: &OwnedFd, waiters: &Waiters) -> bool {
    const BATCH: usize = 256;
    let mut events = [MaybeUninit::<epoll::Event>::uninit(); BATCH];
    // Timeout 0: the AsyncFd said there is something; never blocks.
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let Ok((ready, _)) = epoll::wait(epoll, &mut events[..], Some(&now)) else {
        return false;
    };
    let waiters = lock(waiters);
    for event in ready.iter() {
        if let Some(notify) = waiters.get(&event.data.u64()) {
            notify.notify_one();
        }
    }
    ready.len() == BATCH
}
