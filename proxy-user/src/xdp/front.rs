//! Loading the XDP front, attaching it to the interfaces in `xdp`, and keeping its rule maps
//! equal to the configuration. Needs Linux 4.18 (`bpf_fib_lookup` from XDP) with CAP_BPF and
//! CAP_NET_ADMIN (or CAP_SYS_ADMIN); 5.9 attaches through a bpf_link, which the kernel
//! detaches when spliced exits however it exits.
use std::{collections::BTreeMap, ffi::CString, fmt};

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{loaded_programs, xdp::XdpLinkId, ProgramError, Xdp, XdpMode},
    Ebpf, EbpfError,
};
use proxy_common::{
    xdp_drop_index, XdpPrefixKey, XdpRoute, XdpRouteKey, XDP_ALLOW_MAP, XDP_DENY_MAP,
    XDP_DROPS_MAP, XDP_PROG, XDP_PROG_FRAGS, XDP_REASONS, XDP_ROUTES_MAP,
};

use super::{
    netlink,
    rules::{MapOp, MapPlan, Reason, RouteIds, RouteRules, TooManyRoutes},
};

/// Why the XDP front could not be loaded, attached or updated.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error(
        "this spliced was built without its XDP object (nightly rust-src or bpf-linker was \
         missing at build time): run `cargo xtask setup` and rebuild, or remove `xdp`"
    )]
    NoObject,
    #[error("loading the XDP object failed (needs CAP_BPF and CAP_NET_ADMIN, or root)")]
    Load(#[source] Box<EbpfError>),
    #[error("the kernel refused the XDP program (needs Linux 4.18 or later)")]
    Verify(#[source] Box<ProgramError>),
    #[error("the XDP object has no {0}")]
    Missing(&'static str),
    #[error("XDP map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error(
        "xdp: interface {0:?} does not exist (check `ip link`; names are fixed, not patterns)"
    )]
    UnknownInterface(String),
    #[error(
        "xdp: interface {interface} already carries XDP program {program} (id {id}): spliced \
         never replaces another program; detach it (`ip link set dev {interface} xdp off`) or \
         remove {interface} from `xdp`"
    )]
    Occupied {
        interface: String,
        program: String,
        id: u32,
    },
    #[error("xdp: cannot ask the kernel which XDP program {interface} carries")]
    Query {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("xdp: attaching to {interface} failed in native ({native}) and in generic mode")]
    Attach {
        interface: String,
        native: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("xdp: detaching from {interface} failed")]
    Detach {
        interface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(transparent)]
    TooManyRoutes(#[from] TooManyRoutes),
}

/// How the program runs on one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (XDP_FLAGS_DRV_MODE): before any skb exists.
    Native,
    /// In the kernel's receive path (XDP_FLAGS_SKB_MODE), for drivers without native XDP.
    Generic,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        })
    }
}

/// Which of the object's two copies of the program is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    /// Marked `frags` (`xdp.frags`, Linux 5.18): the kernel may hand it multi-buffer frames.
    Frags,
    /// The plain one (`xdp`), for older kernels.
    Plain,
}

impl ProgramKind {
    fn name(self) -> &'static str {
        match self {
            ProgramKind::Frags => XDP_PROG_FRAGS,
            ProgramKind::Plain => XDP_PROG,
        }
    }
}

impl fmt::Display for ProgramKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProgramKind::Frags => "multi-buffer (frags)",
            ProgramKind::Plain => "single-buffer",
        })
    }
}

struct Attachment {
    link: XdpLinkId,
    mode: AttachMode,
}

/// The loaded XDP front. Dropping it detaches the program from every interface.
pub struct XdpFront {
    routes: HashMap<MapData, XdpRouteKey, XdpRoute>,
    allow: LpmTrie<MapData, XdpPrefixKey, u32>,
    deny: LpmTrie<MapData, XdpPrefixKey, u32>,
    drops: PerCpuArray<MapData, u64>,
    attached: BTreeMap<String, Attachment>,
    plan: MapPlan,
    ids: RouteIds,
    generic_only: bool,
    kind: ProgramKind,
    // Owns the program and its links: dropped last, it detaches.
    ebpf: Ebpf,
}

impl XdpFront {
    /// Loads `object` (the embedded `proxy-xdp`) and verifies the program; attaches nothing.
    /// The `frags` copy where the kernel takes it (5.18), else the plain one; the log says which.
    pub fn load(object: &[u8]) -> Result<XdpFront, XdpError> {
        Self::load_kind(object, None)
    }

    /// As [`XdpFront::load`], but only the copy `kind`, with no fallback (for tests and
    /// measurements of one against the other).
    pub fn load_only(object: &[u8], kind: ProgramKind) -> Result<XdpFront, XdpError> {
        Self::load_kind(object, Some(kind))
    }

    fn load_kind(object: &[u8], only: Option<ProgramKind>) -> Result<XdpFront, XdpError> {
        if object.is_empty() {
            return Err(XdpError::NoObject);
        }
        raise_memlock_limit();
        let mut ebpf = Ebpf::load(object).map_err(|e| XdpError::Load(Box::new(e)))?;
        let kind = match only {
            Some(kind) => load_program(&mut ebpf, kind).map(|()| kind)?,
            // Kernels before 5.18 refuse BPF_F_XDP_HAS_FRAGS with EINVAL: take the plain copy.
            None => match load_program(&mut ebpf, ProgramKind::Frags) {
                Ok(()) => ProgramKind::Frags,
                Err(e) => {
                    load_program(&mut ebpf, ProgramKind::Plain)?;
                    tracing::info!(
                        "XDP front: the kernel refused the multi-buffer (frags) program, so \
                         the single-buffer one is loaded (Linux before 5.18): {}",
                        error_chain(&e)
                    );
                    ProgramKind::Plain
                }
            },
        };
        let routes = take(&mut ebpf, XDP_ROUTES_MAP)?;
        let allow = take(&mut ebpf, XDP_ALLOW_MAP)?;
        let deny = take(&mut ebpf, XDP_DENY_MAP)?;
        let drops = take(&mut ebpf, XDP_DROPS_MAP)?;
        Ok(XdpFront {
            routes,
            allow,
            deny,
            drops,
            attached: BTreeMap::new(),
            plan: MapPlan::default(),
            ids: RouteIds::default(),
            generic_only: false,
            kind,
            ebpf,
        })
    }

    /// Attaches to the interfaces in `names` that do not have the program yet and detaches
    /// from those no longer listed. An interface that carries another XDP program is refused
    /// before anything changes.
    pub fn set_interfaces(&mut self, names: &[String]) -> Result<(), XdpError> {
        for name in names.iter().filter(|n| !self.attached.contains_key(*n)) {
            let ifindex = ifindex(name)?;
            ensure_free(name, ifindex)?;
        }
        let gone: Vec<String> = self
            .attached
            .keys()
            .filter(|n| !names.contains(n))
            .cloned()
            .collect();
        for name in names {
            if !self.attached.contains_key(name) {
                let attachment = self.attach(name)?;
                self.attached.insert(name.clone(), attachment);
            }
        }
        for name in gone {
            if let Some(a) = self.attached.remove(&name) {
                self.program()?
                    .detach(a.link)
                    .map_err(|source| XdpError::Detach {
                        interface: name.clone(),
                        source: Box::new(source),
                    })?;
                tracing::info!("XDP front detached from {name}");
            }
        }
        Ok(())
    }

    /// Attach in generic mode even where the driver has native XDP (for interfaces attached
    /// from now on): for tests, and for a driver whose native XDP misbehaves.
    pub fn set_generic_only(&mut self, generic_only: bool) {
        self.generic_only = generic_only;
    }

    /// The copy of the program that is loaded.
    pub fn kind(&self) -> ProgramKind {
        self.kind
    }

    /// Whether interfaces are attached in generic mode whatever the driver has.
    pub fn generic_only(&self) -> bool {
        self.generic_only
    }

    fn program(&mut self) -> Result<&mut Xdp, XdpError> {
        program_of(&mut self.ebpf, self.kind)
    }

    /// Native mode first; generic where the driver has none. The log says which.
    fn attach(&mut self, name: &str) -> Result<Attachment, XdpError> {
        let (generic_only, kind) = (self.generic_only, self.kind);
        let program = self.program()?;
        let native = if generic_only {
            "not tried: generic mode asked for".to_owned()
        } else {
            match program.attach(name, XdpMode::Driver) {
                Ok(link) => {
                    tracing::info!("XDP front attached to {name} in native mode ({kind} program)");
                    return Ok(Attachment {
                        link,
                        mode: AttachMode::Native,
                    });
                }
                Err(e) => error_chain(&e),
            }
        };
        match program.attach(name, XdpMode::Skb) {
            Ok(link) => {
                tracing::info!(
                    "XDP front attached to {name} in generic mode ({kind} program; native: \
                     {native})"
                );
                Ok(Attachment {
                    link,
                    mode: AttachMode::Generic,
                })
            }
            Err(source) => Err(XdpError::Attach {
                interface: name.to_owned(),
                native,
                source: Box::new(source),
            }),
        }
    }

    /// The interfaces the program is attached to, and how.
    pub fn interfaces(&self) -> impl Iterator<Item = (&str, AttachMode)> {
        self.attached.iter().map(|(n, a)| (n.as_str(), a.mode))
    }

    /// Makes the rule maps hold exactly `routes`' rules, updating entries in place (see
    /// [`MapPlan::changes_to`] for the order). New route ids start with zeroed counters.
    pub fn set_routes(&mut self, routes: &[RouteRules]) -> Result<(), XdpError> {
        let fresh = self.ids.assign(routes.iter().map(|r| r.name.as_str()))?;
        for id in fresh {
            self.zero_counters(id)?;
        }
        let next = MapPlan::compile(routes, &self.ids);
        for op in self.plan.changes_to(&next) {
            self.apply(op)?;
        }
        self.plan = next;
        Ok(())
    }

    fn apply(&mut self, op: MapOp) -> Result<(), XdpError> {
        let trie_key = |(len, data): (u32, XdpPrefixKey)| Key::new(len, data);
        let result = match op {
            MapOp::InsertDeny(k) => self.deny.insert(&trie_key(k), 1, 0).map(|_| XDP_DENY_MAP),
            MapOp::InsertAllow(k) => self.allow.insert(&trie_key(k), 1, 0).map(|_| XDP_ALLOW_MAP),
            MapOp::SetRoute(k, v) => self.routes.insert(k, v, 0).map(|_| XDP_ROUTES_MAP),
            MapOp::RemoveRoute(k) => self.routes.remove(&k).map(|_| XDP_ROUTES_MAP),
            MapOp::RemoveAllow(k) => self.allow.remove(&trie_key(k)).map(|_| XDP_ALLOW_MAP),
            MapOp::RemoveDeny(k) => self.deny.remove(&trie_key(k)).map(|_| XDP_DENY_MAP),
        };
        let name = match op {
            MapOp::InsertDeny(_) | MapOp::RemoveDeny(_) => XDP_DENY_MAP,
            MapOp::InsertAllow(_) | MapOp::RemoveAllow(_) => XDP_ALLOW_MAP,
            MapOp::SetRoute(..) | MapOp::RemoveRoute(_) => XDP_ROUTES_MAP,
        };
        result.map(drop).map_err(|source| XdpError::Map {
            name,
            source: Box::new(source),
        })
    }

    fn zero_counters(&mut self, id: u32) -> Result<(), XdpError> {
        let map = |source| XdpError::Map {
            name: XDP_DROPS_MAP,
            source: Box::new(source),
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| map(MapError::IoError(e)))?;
        for reason in 0..XDP_REASONS {
            let zeros =
                PerCpuValues::try_from(vec![0u64; cpus]).map_err(|e| map(MapError::IoError(e)))?;
            self.drops
                .set(xdp_drop_index(id, reason), zeros, 0)
                .map_err(map)?;
        }
        Ok(())
    }

    /// Packets the program dropped for route `name` and `reason`, summed over the CPUs.
    pub fn drops(&self, name: &str, reason: Reason) -> Result<u64, XdpError> {
        let Some(id) = self.ids.get(name) else {
            return Ok(0);
        };
        let values = self
            .drops
            .get(&xdp_drop_index(id, reason.index()), 0)
            .map_err(|source| XdpError::Map {
                name: XDP_DROPS_MAP,
                source: Box::new(source),
            })?;
        Ok(values.iter().sum())
    }
}

fn program_of(ebpf: &mut Ebpf, kind: ProgramKind) -> Result<&mut Xdp, XdpError> {
    ebpf.program_mut(kind.name())
        .ok_or(XdpError::Missing("program"))?
        .try_into()
        .map_err(|e| XdpError::Verify(Box::new(e)))
}

fn load_program(ebpf: &mut Ebpf, kind: ProgramKind) -> Result<(), XdpError> {
    program_of(ebpf, kind)?
        .load()
        .map_err(|e| XdpError::Verify(Box::new(e)))
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, XdpError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    ebpf.take_map(name)
        .ok_or(XdpError::Missing(name))?
        .try_into()
        .map_err(|source| XdpError::Map {
            name,
            source: Box::new(source),
        })
}

fn ifindex(name: &str) -> Result<u32, XdpError> {
    let unknown = || XdpError::UnknownInterface(name.to_owned());
    let c = CString::new(name).map_err(|_| unknown())?;
    // SAFETY: a NUL-terminated string that outlives the call.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(unknown()),
        i => Ok(i),
    }
}

/// Refuses an interface that carries any XDP program (never replace someone else's), naming
/// the program. aya's netlink fallback for kernels before 5.9 would replace it silently.
fn ensure_free(name: &str, ifindex: u32) -> Result<(), XdpError> {
    let ids = netlink::attached_programs(ifindex).map_err(|source| XdpError::Query {
        interface: name.to_owned(),
        source,
    })?;
    let Some(&id) = ids.first() else {
        return Ok(());
    };
    let program = loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_owned))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "(unnamed)".into());
    Err(XdpError::Occupied {
        interface: name.to_owned(),
        program,
        id,
    })
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so loading does not fail
/// there. (The same as the sockmap loader's; one copy once the loaders share `ebpf/`.)
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct. Failure only matters on old kernels, where
    // loading then reports its own error.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}
