//! The running kernel's version, for the sockmap bugs a probe cannot see (they show under load
//! or at a FIN).
/// A kernel's version, for the bugs a probe cannot see (they show under load or at a FIN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion(pub u32, pub u32, pub u32);

impl std::fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// Kernel series with sockmap bugs that corrupt or stall a spliced connection, and the first
/// stable release of each with the fix (None: the series ended without it). The 6.0 switch of
/// the verdict path to `tcp_read_skb` lost FINs, mis-tracked `copied_seq` and missed wake-ups
/// (sockmap.md, point 10); John Fastabend's series "bpf, sockmap: Fix bugs in sockmap
/// tcp_read_skb" fixed it in 6.4 and was backported to 6.1.31 and 6.3.5.
const TCP_READ_SKB_BUGS: &[(u32, u32, Option<u32>)] = &[
    (6, 0, None),
    (6, 1, Some(31)),
    (6, 2, None),
    (6, 3, Some(5)),
];

impl KernelVersion {
    /// The running kernel's version, from uname(2).
    pub fn running() -> Option<KernelVersion> {
        // SAFETY: utsname is plain data (arrays of c_char); all zeroes is a valid value.
        let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: a valid, writable utsname.
        if unsafe { libc::uname(&mut uts) } != 0 {
            return None;
        }
        let field = |f: &[libc::c_char]| {
            // SAFETY: uname NUL-terminates each field within its array.
            unsafe { std::ffi::CStr::from_ptr(f.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        };
        Self::parse(&field(&uts.release), &field(&uts.version))
    }

    /// From `uname -r` (`6.1.31`, `6.12.117+deb12-cloud-amd64`) and `uname -v`. Debian's
    /// releases keep the patch level at 0 (`6.1.0-56-cloud-amd64`); the real one is in the
    /// version string (`#1 SMP PREEMPT_DYNAMIC Debian 6.1.158-1 (2025-11-09)`).
    pub fn parse(release: &str, version: &str) -> Option<KernelVersion> {
        let numbers = |s: &str| -> Option<KernelVersion> {
            let mut it = s
                .split(|c: char| !c.is_ascii_digit())
                .map(|p| p.parse::<u32>().ok());
            let (major, minor) = (it.next()??, it.next()??);
            let patch = it.next().flatten().unwrap_or(0);
            Some(KernelVersion(major, minor, patch))
        };
        let mut v = numbers(release)?;
        if v.2 == 0 {
            let debian = version
                .split_once("Debian ")
                .and_then(|(_, rest)| numbers(rest.split_whitespace().next()?));
            if let Some(d) = debian.filter(|d| (d.0, d.1) == (v.0, v.1)) {
                v.2 = d.2;
            }
        }
        Some(v)
    }

    /// The known sockmap bug this kernel has, if any. A patch level unknown to us (a distribution
    /// kernel that reports x.y.0) counts as unfixed: splice is slower, never wrong.
    pub fn known_bug(self) -> Option<String> {
        let KernelVersion(major, minor, patch) = self;
        let (_, _, fixed) = TCP_READ_SKB_BUGS
            .iter()
            .find(|(ma, mi, _)| (*ma, *mi) == (major, minor))?;
        match fixed {
            Some(first) if patch >= *first => None,
            Some(first) => Some(format!(
                "the verdict path's tcp_read_skb loses FINs and mis-counts copied bytes \
                 (fixed in {major}.{minor}.{first}; 6.4 and later are not affected)"
            )),
            None => Some(format!(
                "the verdict path's tcp_read_skb loses FINs and mis-counts copied bytes \
                 ({major}.{minor} never got the fix; 6.1.31, 6.3.5 and 6.4 or later have it)"
            )),
        }
    }
}

#[cfg(test)]
mod tests;
