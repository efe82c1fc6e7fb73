//! [`Topology`]: a network namespace of its own joined to the host by a veth pair, with
//! link-local addresses (and a private IPv4 /30), removed on drop, also when the test panics.
use std::{
    fs::File,
    io,
    net::TcpListener,
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use crate::sh;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace `spl-<pid>-<n>` joined to the host by veth `sp<pid>h<n>` (host side, `fe80::1`)
/// and `eth0` (inside, `fe80::2`), plus `10.213.x.y/30` IPv4 addresses for IPv4 tests.
pub struct Topology {
    pub netns: String,
    /// The host side of the veth pair: the zone of `fe80::2`.
    pub host_if: String,
    pub n: u32,
}

impl Topology {
    pub fn new() -> Topology {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let topo = Topology {
            netns: format!("spl-{pid}-{n}"),
            host_if: format!("sp{}h{n}", pid % 10_000_000),
            n,
        };
        sh(&["ip", "netns", "add", &topo.netns]);
        // From here on, drop removes what exists.
        topo.add_veth();
        topo.ip(&["link", "set", "lo", "up"]);
        topo
    }

    /// Creates (or re-creates) the veth pair with its addresses.
    pub fn add_veth(&self) {
        let (ns, h) = (&self.netns, &self.host_if);
        let (a, b) = self.ipv4();
        sh(&[
            "ip", "link", "add", h, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        sh(&["ip", "addr", "add", "fe80::1/64", "dev", h, "nodad"]);
        sh(&["ip", "addr", "add", &format!("{a}/30"), "dev", h]);
        sh(&["ip", "link", "set", h, "up"]);
        self.ip(&["addr", "add", "fe80::2/64", "dev", "eth0", "nodad"]);
        self.ip(&["addr", "add", &format!("{b}/30"), "dev", "eth0"]);
        self.ip(&["link", "set", "eth0", "up"]);
    }

    /// Runs `ip -n NETNS ARGS` in the namespace, panicking unless it succeeds.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "-n", &self.netns];
        all.extend_from_slice(args);
        sh(&all)
    }

    /// Deletes the veth pair (both ends).
    pub fn delete_veth(&self) {
        sh(&["ip", "link", "delete", &self.host_if]);
    }

    /// (host side, namespace side) IPv4 addresses of this topology's /30.
    pub fn ipv4(&self) -> (String, String) {
        let base = (self.n % 16_384) * 4;
        let (third, fourth) = (base / 256, base % 256);
        (
            format!("10.213.{third}.{}", fourth + 1),
            format!("10.213.{third}.{}", fourth + 2),
        )
    }

    /// The interface index of the host side (for `%index` zones).
    pub fn host_if_index(&self) -> u32 {
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", self.host_if))
            .expect("host veth exists")
            .trim()
            .parse()
            .expect("ifindex is a number")
    }

    /// `[fe80::2%<host_if>]:port`: how the host reaches a server in the namespace.
    pub fn upstream(&self, port: u16) -> String {
        format!("[fe80::2%{}]:{port}", self.host_if)
    }

    /// Runs `f` on a thread that has joined the namespace; sockets created there stay in the
    /// namespace when handed back.
    pub fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in_netns(&self.netns, f)
    }

    /// A listener on `[::]:0` inside the namespace (reachable at `fe80::2` and the IPv4 address).
    pub fn listen(&self) -> TcpListener {
        self.in_netns(|| TcpListener::bind("[::]:0").expect("bind in namespace"))
    }

    /// A listener in the namespace and the upstream address that reaches it from the host
    /// (`[fe80::2%<host_if>]:port`).
    pub fn upstream_listener(&self) -> (TcpListener, String) {
        let listener = self.listen();
        let upstream = self.upstream(listener.local_addr().unwrap().port());
        (listener, upstream)
    }
}

/// Runs `f` on a thread that has joined namespace `ns` (by its name under /var/run/netns);
/// sockets created there stay in the namespace when handed back.
pub fn run_in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // The namespace's end of the veth goes with it, and the host end with its peer.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
        let _ = Command::new("ip")
            .args(["link", "delete", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}
