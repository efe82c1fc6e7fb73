//! Loading the verdict program and putting connections into its maps.
//!
//! The program loads on Linux 5.10 (verdict-only `sk_skb/stream_verdict`,
//! `bpf_get_socket_cookie` for sk_skb) with CAP_BPF and CAP_NET_ADMIN (or root), but the data
//! path also needs a kernel whose `recvmsg` on a sockmap socket re-runs the verdict on bytes
//! queued before the insert (the 2023 stable fixes; [`Sockmap::probe`] checks it: 5.10 fails
//! there, 6.1 and later pass), and refuses kernels with known unfixed sockmap bugs by version
//! ([`KernelVersion::known_bug`]): those show only under load or at a FIN, not in a probe.
use std::{
    os::fd::RawFd,
    sync::{Arc, Mutex},
};

use aya::{
    maps::{HashMap, MapData, RingBuf, SockHash},
    programs::SkSkb,
    Ebpf,
};
use proxy_common::{
    SockLimit, SockStats, ACTIVE_MAP, LIMITS_MAP, PRESSURE_MAP, STATS_MAP, TARGETS_MAP,
    VERDICT_PROG,
};

use crate::sockopt;

mod kernel;
mod probe;
mod watch;

pub use kernel::KernelVersion;
pub use watch::{Watch, Watcher};

/// Why the sockmap data path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// Built without the eBPF toolchain.
    #[error(
        "this spliced was built without its eBPF object (nightly rust-src or bpf-linker was \
         missing at build time): run `cargo xtask setup` and rebuild"
    )]
    NoObject,
    /// A kernel whose sockmap bugs no probe can see ([`KernelVersion::known_bug`]).
    #[error("kernel {kernel} has a sockmap bug spliced cannot work around: {bug}")]
    KnownBug { kernel: KernelVersion, bug: String },
    /// The object did not load.
    #[error("loading the eBPF program failed: {source}{}", privilege_hint(&.source.to_string()))]
    Load {
        #[source]
        source: aya::EbpfError,
    },
    /// The object lacks a map or program this build expects.
    #[error("the eBPF object has no {kind} {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    /// A map is not of the expected type.
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// The program could not be loaded, verified or attached.
    #[error("{step}: {source}{hint}", hint = privilege_hint(&format!("{:?}", .source)))]
    Program {
        step: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The daemon's side of the set-up (epoll, the pressure ring).
    #[error("{step}: {source}")]
    Setup {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A probe step failed with an error.
    #[error("sockmap probe: {step}: {source}")]
    ProbeIo {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A probe check found the kernel behaving otherwise than the data path needs; the text
    /// says what it saw.
    #[error("sockmap probe: {0}")]
    Probe(String),
}

/// Why a connection could not be put into the maps.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    /// A socket was no longer ESTABLISHED (sockmap.md, trap 4: a client that sent and shut down
    /// at once is often in CLOSE_WAIT already). The connection needs a userspace path.
    #[error("socket not ESTABLISHED (sockmap accepts only established sockets)")]
    NotEstablished,
    /// Any other map failure (map full, ...).
    #[error("sockmap insert failed: {0}")]
    Map(#[from] aya::maps::MapError),
    /// The byte counters the FIN check starts from could not be read at a moment when no byte
    /// arrived (a flood of small segments); nothing was inserted.
    #[error("bytes kept arriving while the sockets' counters were read: {0}")]
    Unsettled(std::io::Error),
}

struct Maps {
    targets: SockHash<MapData, u64>,
    active: SockHash<MapData, u64>,
    stats: HashMap<MapData, u64, SockStats>,
    limits: HashMap<MapData, u64, SockLimit>,
}

/// The loaded verdict program and its maps. Dropping it detaches the program and frees the maps.
pub struct Sockmap {
    maps: Mutex<Maps>,
    watcher: Arc<Watcher>,
    log_reader: Option<tokio::task::JoinHandle<()>>,
    pressure_reader: tokio::task::JoinHandle<()>,
    // Kept alive: dropping `Ebpf` detaches the program (aya).
    _ebpf: Ebpf,
}

/// Which sockets of a pair run the verdict after [`Sockmap::insert`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Both,
    /// The upstream was no longer ESTABLISHED: only the client's bytes go through the kernel.
    ClientOnly,
}

/// The two sockets of one connection, as the maps know them.
#[derive(Clone, Copy, Debug)]
pub struct Pair {
    pub client: RawFd,
    pub client_cookie: u64,
    pub upstream: RawFd,
    pub upstream_cookie: u64,
}

impl Sockmap {
    /// Loads `object` (the embedded eBPF object), attaches the verdict program to the active map
    /// and starts forwarding the program's aya-log records to the `log` crate.
    /// Must be called inside a tokio runtime.
    pub fn load(object: &[u8]) -> Result<Sockmap, Unavailable> {
        if object.is_empty() {
            return Err(Unavailable::NoObject);
        }
        if let Some(kernel) = KernelVersion::running() {
            if let Some(bug) = kernel.known_bug() {
                return Err(Unavailable::KnownBug { kernel, bug });
            }
        }
        raise_memlock_limit();
        let mut ebpf = Ebpf::load(object).map_err(|source| Unavailable::Load { source })?;
        let log_reader = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_reader(logger),
            Err(e) => {
                tracing::warn!("eBPF log records will not be shown: {e}");
                None
            }
        };
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or(Unavailable::Missing { kind: "map", name })
        };
        let map = |name| move |source| Unavailable::Map { name, source };
        let targets: SockHash<MapData, u64> = take(&mut ebpf, TARGETS_MAP)?
            .try_into()
            .map_err(map(TARGETS_MAP))?;
        let active: SockHash<MapData, u64> = take(&mut ebpf, ACTIVE_MAP)?
            .try_into()
            .map_err(map(ACTIVE_MAP))?;
        let stats: HashMap<MapData, u64, SockStats> = take(&mut ebpf, STATS_MAP)?
            .try_into()
            .map_err(map(STATS_MAP))?;
        let limits: HashMap<MapData, u64, SockLimit> = take(&mut ebpf, LIMITS_MAP)?
            .try_into()
            .map_err(map(LIMITS_MAP))?;
        let pressure: RingBuf<MapData> = take(&mut ebpf, PRESSURE_MAP)?
            .try_into()
            .map_err(map(PRESSURE_MAP))?;
        let program: &mut SkSkb = ebpf
            .program_mut(VERDICT_PROG)
            .ok_or(Unavailable::Missing {
                kind: "program",
                name: VERDICT_PROG,
            })?
            .try_into()
            .map_err(|source| Unavailable::Program {
                step: VERDICT_PROG,
                source,
            })?;
        program.load().map_err(|source| Unavailable::Program {
            step: "the kernel refused the sk_skb verdict program (needs Linux 5.10 or later)",
            source,
        })?;
        program
            .attach(active.fd())
            .map_err(|source| Unavailable::Program {
                step: "attaching the verdict program failed",
                source,
            })?;
        let watcher = Arc::new(Watcher::new().map_err(|source| Unavailable::Setup {
            step: "epoll_create",
            source,
        })?);
        let pressure_reader = spawn_pressure_reader(pressure, watcher.clone())?;
        Ok(Sockmap {
            maps: Mutex::new(Maps {
                targets,
                active,
                stats,
                limits,
            }),
            watcher,
            log_reader,
            pressure_reader,
            _ebpf: ebpf,
        })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way the
        // kernel cares about; keep serving.
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts both sockets into the maps: counters and limits, then both targets, then both
    /// active (trap 2: a socket activated before its peer is a target loses its bytes).
    ///
    /// The client is activated first: it is the one likely to have gone to CLOSE_WAIT already
    /// (trap 4), and if its activation fails nothing was active, so the pair leaves the maps
    /// without ever having run the verdict. If the upstream's activation fails (it closed in the
    /// last microseconds), the client stays active and the result says so: the caller serves the
    /// upstream's direction in userspace. Taking an active socket out of `ACTIVE` while bytes
    /// arrive is never done: a verdict detached in the middle of a receive drops them.
    ///
    /// `limit: None` leaves both sockets unbounded (the verdict's default without a `LIMITS`
    /// entry) until the first [`Sockmap::set_limit`], and saves two map updates.
    pub fn insert(&self, pair: &Pair, limit: Option<SockLimit>) -> Result<Activation, InsertError> {
        let mut m = self.maps();
        let zero = SockStats::default();
        let (c, u) = (pair.client_cookie, pair.upstream_cookie);
        let steps = (|| -> Result<(), aya::maps::MapError> {
            m.stats.insert(c, zero, 0)?;
            m.stats.insert(u, zero, 0)?;
            if let Some(limit) = limit {
                m.limits.insert(c, limit, 0)?;
                m.limits.insert(u, limit, 0)?;
            }
            m.targets.insert(c, pair.upstream, 0)?;
            m.targets.insert(u, pair.client, 0)?;
            m.active.insert(c, pair.client, 0)
        })();
        if let Err(e) = steps {
            remove_all(&mut m, pair);
            return Err(classify(e));
        }
        match m.active.insert(u, pair.upstream, 0).map_err(classify) {
            Ok(()) => Ok(Activation::Both),
            Err(InsertError::NotEstablished) => Ok(Activation::ClientOnly),
            Err(e) => Err(e),
        }
    }

    /// Removes the pair from every map. Only after the backlogs have drained (trap 6): a socket
    /// leaving the maps drops the bytes still queued in its psock.
    pub fn remove(&self, pair: &Pair) {
        remove_all(&mut self.maps(), pair);
    }

    /// Drops the pair's counters and limits, for sockets that are closed right after: closing
    /// a socket takes it out of every sockhash itself (`sock_map_close`), so the four sockhash
    /// deletes of [`Sockmap::remove`] would only add work to every connection's end. The same
    /// rule applies: only once no byte can arrive any more, or with both sides being reset.
    pub fn forget(&self, pair: &Pair) {
        let mut m = self.maps();
        for cookie in [pair.client_cookie, pair.upstream_cookie] {
            let _ = m.stats.remove(&cookie);
            let _ = m.limits.remove(&cookie);
        }
    }

    /// The verdict program's counters for a socket.
    pub fn stats(&self, cookie: u64) -> SockStats {
        self.maps().stats.get(&cookie, 0).unwrap_or_default()
    }

    /// Sets the bound and progress the verdict checks for socket `cookie`.
    pub fn set_limit(&self, cookie: u64, limit: SockLimit) -> Result<(), aya::maps::MapError> {
        self.maps().limits.insert(cookie, limit, 0)
    }

    /// The epoll set that reports FIN, RST, errors and pressure for sockmap connections.
    pub fn watcher(&self) -> &Watcher {
        &self.watcher
    }
}

/// Trap 3: bytes that reached a socket before it was activated stay in its receive queue until
/// the next packet. A non-blocking `recv` on a sockmap socket re-runs the data-ready path, which
/// hands them to the verdict in order. It returns EAGAIN, or 0 when a FIN was already queued.
/// Any byte actually returned would be out of band for the redirect: report it as an error.
pub fn flush_early_bytes(fd: RawFd) -> std::io::Result<()> {
    let mut byte = [0u8; 1];
    match sockopt::recv_nonblocking(fd, &mut byte)? {
        None | Some(0) => Ok(()),
        Some(_) => Err(std::io::Error::other(
            "recv returned payload on a sockmap socket: the kernel did not redirect it",
        )),
    }
}

fn remove_all(m: &mut Maps, pair: &Pair) {
    for cookie in [pair.client_cookie, pair.upstream_cookie] {
        let _ = m.active.remove(&cookie);
    }
    for cookie in [pair.client_cookie, pair.upstream_cookie] {
        let _ = m.targets.remove(&cookie);
        let _ = m.stats.remove(&cookie);
        let _ = m.limits.remove(&cookie);
    }
}

fn classify(e: aya::maps::MapError) -> InsertError {
    if let aya::maps::MapError::SyscallError(s) = &e {
        if s.io_error.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return InsertError::NotEstablished;
        }
    }
    InsertError::Map(e)
}

fn privilege_hint(e: &str) -> &'static str {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || e.contains("Operation not permitted") || e.contains("EPERM") {
        " (loading eBPF needs root, or CAP_BPF and CAP_NET_ADMIN)"
    } else {
        ""
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so loading does not fail there.
pub(crate) fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct. Failure only matters on old kernels, where
    // loading then reports its own error.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

impl Drop for Sockmap {
    fn drop(&mut self) {
        if let Some(reader) = self.log_reader.take() {
            reader.abort();
        }
        self.pressure_reader.abort();
    }
}

/// Forwards the verdict's pressure reports (a cookie each) to the connection they concern.
fn spawn_pressure_reader(
    ring: RingBuf<MapData>,
    watcher: Arc<Watcher>,
) -> Result<tokio::task::JoinHandle<()>, Unavailable> {
    // SAFETY: the RingBuf owns its map fd and keeps it open while it lives.
    let mut ring = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    }
    .map_err(|e| Unavailable::Setup {
        step: "registering the pressure ring",
        source: e.into(),
    })?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = ring.readable_mut().await else {
                return;
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if let Ok(bytes) = <[u8; 8]>::try_from(&item[..]) {
                    watcher.notify(u64::from_ne_bytes(bytes));
                }
            }
            guard.clear_ready();
        }
    }))
}

fn spawn_log_reader(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> Option<tokio::task::JoinHandle<()>> {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open while it lives.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut logger = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("eBPF log records will not be shown: {e}");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}
