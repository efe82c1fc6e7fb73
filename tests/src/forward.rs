//! The usual set-ups: [`Forward`], a namespace with an upstream listener and a daemon with one
//! route to it; [`Configured`], the same for a daemon started from a configuration file.
use std::{
    net::{TcpListener, TcpStream},
    time::Duration,
};

use crate::{accept, set_timeouts, Spliced, TempDir, Topology};

/// How long the upstream may wait for the daemon's dial.
const ACCEPT: Duration = Duration::from_secs(10);

/// A namespace with a listener, and a daemon routing to it (by `[fe80::2%if]:port`). Dropped in
/// this order: the daemon, the listener, the namespace.
pub struct Forward {
    pub spliced: Spliced,
    pub listener: TcpListener,
    pub topo: Topology,
}

impl Forward {
    /// A daemon with one route `--mode MODE` and `extra` arguments; None when `mode` is sockmap
    /// and the kernel cannot run it (and that is allowed; see [`Spliced::route`]).
    pub fn start(mode: &str, extra: &[&str]) -> Option<Forward> {
        let topo = Topology::new();
        let (listener, upstream) = topo.upstream_listener();
        let spliced = Spliced::route(mode, &upstream, extra)?;
        Some(Forward {
            spliced,
            listener,
            topo,
        })
    }

    /// A client connected to the daemon, with timeouts `io`.
    pub fn connect(&self, io: Duration) -> TcpStream {
        let c = self.spliced.connect();
        set_timeouts(&c, io);
        c
    }

    /// The next connection the daemon dials (at most 10 s), with timeouts `io`.
    pub fn accept(&self, io: Duration) -> TcpStream {
        let s = accept(&self.listener, ACCEPT);
        set_timeouts(&s, io);
        s
    }

    /// A client and its upstream connection, with timeouts `io`.
    pub fn pair(&self, io: Duration) -> (TcpStream, TcpStream) {
        let c = self.connect(io);
        (c, self.accept(io))
    }
}

/// A namespace with an upstream listener, and a temporary directory for the configuration of a
/// daemon started by [`Configured::start`]. Dropped in this order: the listener, the directory,
/// the namespace (a daemon started from it is dropped before, being declared after it).
pub struct Configured {
    pub listener: TcpListener,
    /// How the host reaches `listener`: `[fe80::2%<host_if>]:port`.
    pub upstream: String,
    pub dir: TempDir,
    pub topo: Topology,
}

impl Configured {
    pub fn new() -> Configured {
        let topo = Topology::new();
        let (listener, upstream) = topo.upstream_listener();
        Configured {
            listener,
            upstream,
            dir: TempDir::new(),
            topo,
        }
    }

    /// Writes the configuration (see [`TempDir::write`]) and starts spliced from it, waiting for
    /// `listeners` routes to listen; None as [`Spliced::start_mode`] says.
    pub fn start(
        &self,
        mode: &str,
        top: &str,
        routes: &[(&str, &str, &str)],
        listeners: usize,
    ) -> Option<Spliced> {
        let config = self.dir.write(mode, top, routes);
        Spliced::start_mode(mode, &["--config", &config], listeners)
    }

    /// [`Configured::start`] with one route, `name`, to [`Configured::upstream`], with the route
    /// keys `keys`.
    pub fn start_route(&self, mode: &str, top: &str, name: &str, keys: &str) -> Option<Spliced> {
        self.start(mode, top, &[(name, &self.upstream, keys)], 1)
    }
}

impl Default for Configured {
    fn default() -> Self {
        Self::new()
    }
}
