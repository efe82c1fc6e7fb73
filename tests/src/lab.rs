//! [`Lab`]: network namespaces of the test's own joined by veth pairs, for set-ups where a
//! client, a front proxy, spliced and the upstreams each sit in a namespace of their own (and
//! so have addresses the host never uses). Removed on drop, also when the test panics.
use std::{
    path::Path,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{run_in_netns, sh, Process};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Namespaces `spl-<pid>-<20000+n>` (so `cargo xtask test` removes those of a killed run).
pub struct Lab {
    names: Vec<String>,
}

/// One end of a veth pair: the namespace (its index in the lab), the device name, and its
/// addresses with their prefix length (IPv6 ones are added without duplicate detection).
pub type End<'a> = (usize, &'a str, &'a [&'a str]);

impl Lab {
    /// `count` namespaces, loopback up in each.
    pub fn new(count: usize) -> Lab {
        let pid = std::process::id();
        let mut lab = Lab { names: Vec::new() };
        for _ in 0..count {
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            let name = format!("spl-{pid}-{}", 20_000 + n);
            sh(&["ip", "netns", "add", &name]);
            // From here on, drop removes it.
            lab.names.push(name);
            sh(&[
                "ip",
                "-n",
                lab.names.last().unwrap(),
                "link",
                "set",
                "lo",
                "up",
            ]);
        }
        lab
    }

    /// The name of namespace `i`.
    pub fn ns(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Joins two namespaces by a veth pair with the given ends, both up.
    pub fn link(&self, a: End<'_>, b: End<'_>) {
        sh(&[
            "ip",
            "-n",
            self.ns(a.0),
            "link",
            "add",
            a.1,
            "type",
            "veth",
            "peer",
            "name",
            b.1,
            "netns",
            self.ns(b.0),
        ]);
        for (i, dev, addrs) in [a, b] {
            let ns = self.ns(i);
            for addr in addrs {
                let mut args = vec!["ip", "-n", ns, "addr", "add", addr, "dev", dev];
                if addr.contains(':') {
                    args.push("nodad");
                }
                sh(&args);
            }
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
    }

    /// Runs `f` on a thread inside namespace `i`; sockets made there stay in it.
    pub fn run_in<T: Send + 'static>(&self, i: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in_netns(self.ns(i), f)
    }

    /// Starts `program ARGS` inside namespace `i` (`ip netns exec` execs it, so the child is the
    /// program itself and is stopped on drop).
    pub fn spawn(&self, i: usize, name: &'static str, program: &Path, args: &[&str]) -> Process {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns(i)])
            .arg(program)
            .args(args);
        Process::spawn(name, &mut cmd)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A veth goes with either of its namespaces.
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
}
