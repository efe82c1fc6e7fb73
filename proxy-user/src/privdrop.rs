//! Dropping root once the daemon is set up: after the eBPF program is loaded and every socket
//! is bound, spliced switches to the configured `user` (its primary group, no supplementary
//! groups) and keeps only the capabilities the running daemon still uses, in every thread.
//!
//! What the running daemon needs was found by trying (Linux 6.18, `tests/tests/daemon.rs`):
//!
//! - `CAP_NET_ADMIN`: `SO_SNDBUFFORCE` (the large send buffers of sockmap sockets, trap 9) and
//!   `SO_RCVBUFFORCE` (the backpressure hand-back fixes a held socket's receive buffer). Without
//!   it a held sockmap connection fails at the hand-back.
//! - `CAP_NET_BIND_SERVICE`: only for a reload that adds a listen port below 1024.
//!
//! - `CAP_BPF`: only where the kernel checks it for every `bpf()` command. Linux 6.18 checks it
//!   only to create maps and load programs: lookups, updates and socket inserts on the maps
//!   spliced already has work without it (measured). Kernels before 6.5 refuse every `bpf()`
//!   command without it while `kernel.unprivileged_bpf_disabled` is set (Debian's default), so
//!   the sockmap path would fail there. Rather than trust a version, spliced tries: a thread
//!   of its own creates a one-entry array map, drops CAP_BPF (capabilities are per thread),
//!   looks the entry up, and exits; CAP_BPF is kept if the lookup was refused.
//!
//! Not needed after start: `CAP_SETUID`/`CAP_SETGID`, `CAP_CHOWN`, `CAP_SYS_ADMIN`;
//! `SO_BINDTODEVICE` needs nothing since Linux 5.7.
//!
//! Credentials are per thread in Linux. glibc's `setuid` changes every thread, but a thread's
//! capabilities survive the switch only if that thread set `PR_SET_KEEPCAPS`, and `capset`
//! changes only the calling thread. So the switch runs, with raw system calls (rustix's
//! per-thread `set_thread_res_uid` and friends), on the main thread
//! and on every tokio worker at once (each worker held by a task waiting at a barrier), and is
//! then checked for every thread of the process in `/proc/self/task`: a thread left with other
//! credentials (an idle blocking-pool thread from before the switch) must exit within a few
//! seconds, or the daemon stops.
use std::{
    ffi::CString,
    io,
    sync::{Arc, Barrier, Mutex},
    time::{Duration, Instant},
};

use rustix::{
    process::{Gid, Uid},
    thread::{self, CapabilitySet, CapabilitySets},
};

/// Linux capability numbers (linux/capability.h).
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
pub const CAP_BPF: u32 = 39;

/// The capabilities the running daemon always keeps, as a bit mask; plus `CAP_BPF` where
/// [`bpf_needs_cap`] finds the kernel wants it for maps that already exist.
pub const KEEP: u64 = (1 << CAP_NET_BIND_SERVICE) | (1 << CAP_NET_ADMIN);

/// The names of the capabilities in `mask`, for the log.
pub fn names(mask: u64) -> String {
    let mut names = Vec::new();
    for (cap, name) in [
        (CAP_NET_BIND_SERVICE, "CAP_NET_BIND_SERVICE"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_BPF, "CAP_BPF"),
    ] {
        if mask & (1 << cap) != 0 {
            names.push(name);
        }
    }
    names.join(", ")
}

/// Whether this kernel refuses a `bpf()` command on an existing map without CAP_BPF: tried in
/// a thread of its own, whose reduced capabilities end with it. Errors (no CAP_BPF to create
/// the trial map in the first place) count as "needed", the safe side.
pub fn bpf_needs_cap() -> bool {
    std::thread::spawn(|| {
        // union bpf_attr, large enough for both commands.
        let mut attr = [0u64; 16];
        // BPF_MAP_CREATE: map_type = BPF_MAP_TYPE_ARRAY (2), key_size 4, value_size 8,
        // max_entries 1.
        attr[0] = 2 | (4 << 32);
        attr[1] = 8 | (1 << 32);
        // SAFETY: the bpf system call with a zeroed, large-enough attribute block.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                0,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if fd < 0 {
            return true;
        }
        let fd = fd as i32;
        // This thread only: CAP_BPF (and CAP_SYS_ADMIN, which also satisfies the check) gone.
        let kept = read_caps().map(|(eff, _)| eff & !(1 << CAP_BPF) & !(1 << 21));
        let dropped = kept.is_some_and(|eff| set_thread_caps(eff, eff).is_ok());
        let (key, mut value) = (0u32, 0u64);
        let mut attr = [0u64; 16];
        // BPF_MAP_LOOKUP_ELEM: map_fd, key pointer, value pointer.
        attr[0] = fd as u64;
        attr[1] = &key as *const u32 as u64;
        attr[2] = &mut value as *mut u64 as u64;
        // SAFETY: as above, with valid key and value pointers.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                1,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        // SAFETY: closing the map this thread created.
        unsafe { libc::close(fd) };
        !dropped || rc < 0
    })
    .join()
    .unwrap_or(true)
}

/// This thread's (effective, permitted) capabilities.
fn read_caps() -> Option<(u64, u64)> {
    let sets = thread::capabilities(None).ok()?;
    Some((sets.effective.bits(), sets.permitted.bits()))
}

/// Sets this thread's effective and permitted capabilities (no inheritable ones).
fn set_thread_caps(effective: u64, permitted: u64) -> io::Result<()> {
    let sets = CapabilitySets {
        effective: CapabilitySet::from_bits_retain(effective),
        permitted: CapabilitySet::from_bits_retain(permitted),
        inheritable: CapabilitySet::empty(),
    };
    thread::set_capabilities(None, sets).map_err(step("capset"))
}

/// Names the step an errno came from.
fn step(what: &'static str) -> impl Fn(rustix::io::Errno) -> io::Error {
    move |e| {
        let e = io::Error::from(e);
        io::Error::new(e.kind(), format!("{what}: {e}"))
    }
}

/// How long threads from before the switch may take to go (tokio's blocking-pool threads idle
/// out after the runtime's keep-alive).
const STRAGGLERS: Duration = Duration::from_secs(10);

/// A user to switch to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Why spliced could not run as the configured user.
#[derive(Debug, thiserror::Error)]
pub enum PrivdropError {
    #[error("{0:?} contains a NUL byte")]
    NulInName(String),
    #[error("cannot look up user {name:?}: {source}")]
    Lookup {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "user {0:?} does not exist on this machine; create it (e.g. useradd --system \
         --no-create-home --shell /usr/sbin/nologin {0}) or remove the key to stay root"
    )]
    NoSuchUser(String),
    /// Switching one thread failed (`worker` or `main`).
    #[error("{which} thread: {source}")]
    Thread {
        which: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot list the threads in /proc/self/task: {0}")]
    ListThreads(#[source] io::Error),
    /// Threads that still run with other credentials after the wait.
    #[error("thread(s) {} still run with other credentials after {STRAGGLERS:?}", .0.join(", "))]
    Stragglers(Vec<String>),
}

/// Looks `name` up in the user database.
pub fn lookup(name: &str) -> Result<User, PrivdropError> {
    let cname = CString::new(name).map_err(|_| PrivdropError::NulInName(name.to_owned()))?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: valid pointers and buffer length; the result points into `pwd`/`buf`.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 {
        return Err(PrivdropError::Lookup {
            name: name.to_owned(),
            source: io::Error::from_raw_os_error(rc),
        });
    }
    if result.is_null() {
        return Err(PrivdropError::NoSuchUser(name.to_owned()));
    }
    Ok(User {
        name: name.to_owned(),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// Switches every thread of the process to `user`, keeping the capabilities in `keep`. Must be
/// called from the thread that runs `block_on` (not a worker) of the multi-threaded runtime
/// `handle`.
pub fn drop_to(
    user: &User,
    keep: u64,
    handle: &tokio::runtime::Handle,
) -> Result<(), PrivdropError> {
    let workers = handle.metrics().num_workers();
    let in_place = Arc::new(Barrier::new(workers + 1));
    let done = Arc::new(Barrier::new(workers + 1));
    let failures = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..workers {
        let (in_place, done, failures, user) = (
            in_place.clone(),
            done.clone(),
            failures.clone(),
            user.clone(),
        );
        // Each task blocks its worker until all are in place: no worker can hold two of them.
        handle.spawn(async move {
            in_place.wait();
            if let Err(e) = drop_this_thread(&user, keep) {
                failures
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(PrivdropError::Thread {
                        which: "worker",
                        source: e,
                    });
            }
            done.wait();
        });
    }
    in_place.wait();
    let mine = drop_this_thread(user, keep);
    done.wait();
    mine.map_err(|source| PrivdropError::Thread {
        which: "main",
        source,
    })?;
    if let Some(e) = failures.lock().unwrap_or_else(|e| e.into_inner()).pop() {
        return Err(e);
    }
    verify(user, keep)
}

fn drop_this_thread(user: &User, keep: u64) -> io::Result<()> {
    // The bounding set first, while CAP_SETPCAP is still there. Capabilities this kernel does
    // not know are refused with EINVAL: nothing to drop.
    for cap in (0..64u32).filter(|cap| keep & (1 << cap) == 0) {
        let set = CapabilitySet::from_bits_retain(1 << cap);
        match thread::remove_capability_from_bounding_set(set) {
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "dropping capability {cap} from the bounding set: {} (spliced must \
                         start as root, or with CAP_SETPCAP, to drop privileges)",
                        io::Error::from(e)
                    ),
                ))
            }
        }
    }
    let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    thread::set_keep_capabilities(true).map_err(step("PR_SET_KEEPCAPS"))?;
    // This thread's credentials only (the raw system calls, not libc's process-wide ones):
    // drop_to runs this on every thread.
    thread::set_thread_groups(&[gid]).map_err(step("setgroups"))?;
    thread::set_thread_res_gid(gid, gid, gid).map_err(step("setresgid"))?;
    thread::set_thread_res_uid(uid, uid, uid).map_err(step("setresuid"))?;
    set_thread_caps(keep, keep)?;
    thread::clear_ambient_capability_set().map_err(step("PR_CAP_AMBIENT_CLEAR_ALL"))?;
    thread::set_keep_capabilities(false).map_err(step("PR_SET_KEEPCAPS"))?;
    thread::set_no_new_privs(true).map_err(step("PR_SET_NO_NEW_PRIVS"))?;
    Ok(())
}

/// What `/proc/self/task/TID/status` says about one thread's credentials.
#[derive(Debug, PartialEq, Eq)]
pub struct ThreadCreds {
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub cap_eff: u64,
    pub cap_prm: u64,
    pub cap_bnd: u64,
}

/// Parses the credential lines of a `/proc/.../status` file.
pub fn parse_status(text: &str) -> Option<ThreadCreds> {
    let ids = |key: &str| -> Option<[u32; 4]> {
        let line = text.lines().find_map(|l| l.strip_prefix(key))?;
        let v: Vec<u32> = line
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        v.try_into().ok()
    };
    let hex = |key: &str| -> Option<u64> {
        let line = text.lines().find_map(|l| l.strip_prefix(key))?;
        u64::from_str_radix(line.trim(), 16).ok()
    };
    Some(ThreadCreds {
        uids: ids("Uid:")?,
        gids: ids("Gid:")?,
        cap_eff: hex("CapEff:")?,
        cap_prm: hex("CapPrm:")?,
        cap_bnd: hex("CapBnd:")?,
    })
}

/// Waits until every thread of the process runs as `user` with `keep` (threads from before the
/// switch may take [`STRAGGLERS`] to exit).
fn verify(user: &User, keep: u64) -> Result<(), PrivdropError> {
    let want = ThreadCreds {
        uids: [user.uid; 4],
        gids: [user.gid; 4],
        cap_eff: keep,
        cap_prm: keep,
        cap_bnd: keep,
    };
    let deadline = Instant::now() + STRAGGLERS;
    loop {
        let mut wrong = Vec::new();
        let tasks = std::fs::read_dir("/proc/self/task").map_err(PrivdropError::ListThreads)?;
        for task in tasks.flatten() {
            let Ok(text) = std::fs::read_to_string(task.path().join("status")) else {
                continue; // gone meanwhile
            };
            if parse_status(&text).as_ref() != Some(&want) {
                let name = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Name:"))
                    .unwrap_or("?")
                    .trim()
                    .to_owned();
                wrong.push(format!("{} ({name})", task.file_name().to_string_lossy()));
            }
        }
        if wrong.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(PrivdropError::Stragglers(wrong));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests;
