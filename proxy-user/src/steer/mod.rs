//! Accept steering: each route listens with one socket per lane (a `SO_REUSEPORT` group), and
//! an `sk_reuseport` program (`proxy-ebpf/src/steer.rs`) hands each new connection to the
//! socket of the lane whose core took the SYN, or to the least loaded lane when that one is
//! ahead by more than [`STEER_SLACK`] connections. The lane accepts it and runs it start to
//! end on its own event loop, as HAProxy runs a connection on one thread: no hand-over between
//! threads, no second thread woken (docs/profiles.md, "Short connections").
//!
//! The loads are the daemon's counts of live connections per lane, written into `STEER_LOAD`
//! through a shared mapping (`BPF_F_MMAPABLE`, Linux 5.5), so counting costs no system call.
use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, OnceLock,
    },
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray, ReusePortSockArray},
    programs::SkReuseport,
    Ebpf,
};
pub use proxy_common::STEER_SLACK;
use proxy_common::{
    STEER_GROUPS_MAP, STEER_LANES_SLOT, STEER_LEAST_SLOT, STEER_LOAD_MAP, STEER_LOAD_SLOTS,
    STEER_MAX_GROUPS, STEER_MAX_LANES, STEER_PICKS_MAP, STEER_PORT_GROUPS, STEER_PROG,
    STEER_SOCKETS_MAP,
};

#[cfg(test)]
mod tests;

/// Why routes accept on one socket instead of steering to the lanes.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("this spliced was built without its eBPF objects")]
    NoObject,
    #[error("loading the accept steering program failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the steering object has no {0}")]
    Missing(&'static str),
    #[error("the steering map {0}: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("the kernel refused the sk_reuseport program: {}", short(.0))]
    Program(#[source] aya::programs::ProgramError),
    #[error("mapping the lanes' load counters failed (needs Linux 5.5): {0}")]
    Mmap(#[source] io::Error),
    #[error("port {0} is steered for {STEER_PORT_GROUPS} other listening addresses already")]
    PortFull(u16),
    #[error("{STEER_MAX_GROUPS} steered listeners already")]
    Full,
}

/// The loaded program, its maps and the mapped loads; loaded once per process.
pub struct Steer {
    ebpf: Mutex<Ebpf>,
    maps: Mutex<Maps>,
    /// Per CPU: the program counts on the CPU it runs on.
    picks: PerCpuArray<MapData, u64>,
    load: Loads,
    /// Kept open beside its mapping.
    _load_map: aya::maps::Map,
}

struct Maps {
    sockets: ReusePortSockArray<MapData>,
    groups: HashMap<MapData, u32, [u32; STEER_PORT_GROUPS]>,
    /// Group index -> its port and whether its sockets are in the maps.
    used: Vec<Option<(u16, bool)>>,
}

impl Maps {
    /// Writes the filled groups of `port` into the program's table (or takes the port out).
    fn publish(&mut self, port: u16) -> Result<(), SteerError> {
        let mut entry = [0; STEER_PORT_GROUPS];
        let filled = (0..)
            .zip(&self.used)
            .filter(|(_, u)| **u == Some((port, true)));
        for (place, (index, _)) in entry.iter_mut().zip(filled) {
            *place = index + 1;
        }
        let key = u32::from(port.to_be());
        if entry[0] == 0 {
            // Fails only for a port that was never in the table: nothing to take out.
            let _ = self.groups.remove(&key);
            return Ok(());
        }
        self.groups
            .insert(key, entry, 0)
            .map_err(|e| SteerError::Map(STEER_GROUPS_MAP, e))
    }
}

/// `STEER_LOAD` mapped into this process: one counter per lane, then the number of lanes.
struct Loads(&'static [AtomicU64]);

static STEER: OnceLock<Result<Steer, SteerError>> = OnceLock::new();

/// The process's steering, if a route loaded it.
pub fn loaded() -> Option<&'static Steer> {
    STEER.get()?.as_ref().ok()
}

/// The process's steering, loaded at the first call from `object` (the embedded one).
pub fn get(object: &[u8]) -> Result<&'static Steer, &'static SteerError> {
    STEER.get_or_init(|| Steer::load(object)).as_ref()
}

impl Steer {
    fn load(object: &[u8]) -> Result<Steer, SteerError> {
        if object.is_empty() {
            return Err(SteerError::NoObject);
        }
        crate::ebpf::raise_memlock_limit();
        let mut ebpf = Ebpf::load(object).map_err(|e| SteerError::Load(Box::new(e)))?;
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(SteerError::Missing(name));
        let sockets = take(STEER_SOCKETS_MAP)?
            .try_into()
            .map_err(|e| SteerError::Map(STEER_SOCKETS_MAP, e))?;
        let groups = take(STEER_GROUPS_MAP)?
            .try_into()
            .map_err(|e| SteerError::Map(STEER_GROUPS_MAP, e))?;
        let picks = take(STEER_PICKS_MAP)?
            .try_into()
            .map_err(|e| SteerError::Map(STEER_PICKS_MAP, e))?;
        let load_map = take(STEER_LOAD_MAP)?;
        let aya::maps::Map::Array(data) = &load_map else {
            return Err(SteerError::Missing("array STEER_LOAD"));
        };
        let load = Loads::map(data).map_err(SteerError::Mmap)?;
        let program: &mut SkReuseport = ebpf
            .program_mut(STEER_PROG)
            .ok_or(SteerError::Missing(STEER_PROG))?
            .try_into()
            .map_err(SteerError::Program)?;
        program.load().map_err(SteerError::Program)?;
        Ok(Steer {
            ebpf: Mutex::new(ebpf),
            maps: Mutex::new(Maps {
                sockets,
                groups,
                used: vec![None; STEER_MAX_GROUPS as usize],
            }),
            picks,
            load,
            _load_map: load_map,
        })
    }

    /// Sets how many lanes the program chooses among (0: leave every choice to the hash).
    pub fn set_lanes(&self, lanes: usize) {
        let lanes = lanes.min(STEER_MAX_LANES as usize) as u64;
        self.load.0[STEER_LANES_SLOT as usize].store(lanes, Ordering::Relaxed);
        self.load.mark_least(self.lanes());
    }

    /// How many lanes the program chooses among.
    pub fn lanes(&self) -> usize {
        self.load.0[STEER_LANES_SLOT as usize].load(Ordering::Relaxed) as usize
    }

    /// Connections each lane carries now.
    pub fn live(&self) -> Vec<u64> {
        let lanes = self.lanes();
        self.load.0[..lanes]
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// Counts a connection on `lane` while the guard lives.
    pub fn enter(&'static self, lane: usize) -> OnLane {
        let slot = &self.load.0[lane % STEER_MAX_LANES as usize];
        slot.fetch_add(1, Ordering::Relaxed);
        self.load.mark_least(self.lanes());
        OnLane(self, slot)
    }

    /// Connections the program handed to each of the lanes so far.
    pub fn picks(&self) -> Vec<u64> {
        (0..self.lanes() as u32)
            .map(|lane| self.picks.get(&lane, 0).map_or(0, |cpus| cpus.iter().sum()))
            .collect()
    }

    /// Reserves a group for `port`, before its sockets are bound. A port takes up to
    /// [`STEER_PORT_GROUPS`] groups, listening on different addresses of it.
    pub fn reserve(&'static self, port: u16) -> Result<Group, SteerError> {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let on_port = maps.used.iter().flatten().filter(|(p, _)| *p == port);
        if on_port.count() >= STEER_PORT_GROUPS {
            return Err(SteerError::PortFull(port));
        }
        let index = maps
            .used
            .iter()
            .position(Option::is_none)
            .ok_or(SteerError::Full)?;
        maps.used[index] = Some((port, false));
        Ok(Group {
            steer: self,
            index: index as u32,
            port,
            filled: 0,
        })
    }
}

/// A steered listening port's slot; its sockets leave the maps when it drops.
pub struct Group {
    steer: &'static Steer,
    index: u32,
    port: u16,
    filled: u32,
}

impl Group {
    /// The steering this group belongs to.
    pub fn steer(&self) -> &'static Steer {
        self.steer
    }

    /// Puts `sockets` (the group's listening sockets, lane by lane) into the maps and attaches
    /// the program to their `SO_REUSEPORT` group.
    pub fn fill<S: AsFd + AsRawFd>(&mut self, sockets: &[S]) -> Result<(), SteerError> {
        let mut maps = self.steer.maps.lock().unwrap_or_else(|e| e.into_inner());
        for (lane, socket) in sockets.iter().enumerate().take(STEER_MAX_LANES as usize) {
            let key = self.index * STEER_MAX_LANES + lane as u32;
            maps.sockets
                .set(key, socket, 0)
                .map_err(|e| SteerError::Map(STEER_SOCKETS_MAP, e))?;
            self.filled = lane as u32 + 1;
        }
        let ebpf = self.steer.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let program: &SkReuseport = ebpf
            .program(STEER_PROG)
            .ok_or(SteerError::Missing(STEER_PROG))?
            .try_into()
            .map_err(SteerError::Program)?;
        if let Some(first) = sockets.first() {
            program.attach(first).map_err(SteerError::Program)?;
        }
        // Last: until the group is in the port's table, the program leaves it to the hash.
        maps.used[self.index as usize] = Some((self.port, true));
        maps.publish(self.port)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let mut maps = self.steer.maps.lock().unwrap_or_else(|e| e.into_inner());
        // First out of the port's table (the port's other groups stay), then its sockets.
        maps.used[self.index as usize] = Some((self.port, false));
        let _ = maps.publish(self.port);
        for lane in 0..self.filled {
            let _ = maps
                .sockets
                .clear_index(&(self.index * STEER_MAX_LANES + lane));
        }
        maps.used[self.index as usize] = None;
    }
}

/// A live connection counted on its lane.
pub struct OnLane(&'static Steer, &'static AtomicU64);

impl Drop for OnLane {
    fn drop(&mut self) {
        self.1.fetch_sub(1, Ordering::Relaxed);
        self.0.load.mark_least(self.0.lanes());
    }
}

/// A refused program's error without the verifier's whole log (thousands of lines, which
/// flooded the journal): the system call's error and the log's last line.
fn short(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let last = log.lines().rev().find(|l| !l.trim().is_empty());
            format!("{io_error} (verifier: {})", last.unwrap_or("no log"))
        }
        e => e.to_string(),
    }
}

impl Loads {
    /// Maps the array's values into this process. aya 0.14 has no mmap for maps, hence libc.
    fn map(array: &MapData) -> io::Result<Loads> {
        let fd = array.fd().as_fd().as_raw_fd();
        // An array map's values sit elem_size apart, its value size rounded up to 8: a u64's
        // values are contiguous, so slot i is the i-th u64 of the mapping.
        let len = STEER_LOAD_SLOTS as usize * std::mem::size_of::<u64>();
        // SAFETY: a shared read-write mapping of a BPF_F_MMAPABLE array's values, which the
        // kernel keeps alive (and the map with it) until munmap, which never happens: the
        // mapping lives as long as the process, like the map.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `len` bytes of u64s, suitably aligned (page-aligned), shared with the kernel,
        // which reads them with plain loads; every access here is atomic.
        let slots = unsafe {
            std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), len / std::mem::size_of::<u64>())
        };
        Ok(Loads(slots))
    }

    /// Writes the least loaded of the first `lanes` lanes into its slot, for the program. Two
    /// threads doing this at once may leave a choice one connection stale until the next
    /// change: the balance is approximate by design, and cheap.
    fn mark_least(&self, lanes: usize) {
        let least = self.0[..lanes.min(STEER_MAX_LANES as usize)]
            .iter()
            .enumerate()
            .min_by_key(|(_, n)| n.load(Ordering::Relaxed))
            .map_or(0, |(i, _)| i);
        self.0[STEER_LEAST_SLOT as usize].store(least as u64, Ordering::Relaxed);
    }
}
