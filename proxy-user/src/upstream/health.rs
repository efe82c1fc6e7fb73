//! Active health checks of a set: a TCP connect to every server each `interval` (followed by a
//! PROXY v2 `LOCAL` header when the route sends PROXY headers), `rise` successes to come up and
//! `fall` failures to go down. Without `health_check`, only servers a dial found down are probed
//! (every [`RECOVERY_INTERVAL`], up at the first success), so a server that comes back takes
//! connections again without a reload and without a client paying for the test.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt, task::JoinHandle, task::JoinSet};
use tracing::debug;

use super::{dial::connect, server::Observation, Target, Upstreams};

/// How often a set without `health_check` probes the servers a dial found down.
pub const RECOVERY_INTERVAL: Duration = Duration::from_secs(2);
/// How long such a probe may take (at most the route's `connect_timeout`).
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(1);

/// The PROXY protocol v2 header with the `LOCAL` command and no addresses (the signature,
/// version 2 | LOCAL, AF_UNSPEC, length 0): what a proxy sends for its own health checks, so a
/// server that requires a PROXY header accepts the check without taking it for a client.
/// Sixteen fixed bytes, written here rather than through a PROXY crate because nothing in it
/// varies.
pub const PROXY_V2_LOCAL: [u8; 16] = *b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";

/// How a set's checks connect: like its dials.
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// The route's (or match's) `interface`.
    pub interface: Option<String>,
    /// The route's `connect_timeout`: a recovery probe takes at most this long.
    pub connect_timeout: Option<Duration>,
    /// Send [`PROXY_V2_LOCAL`] after connecting: set it when the route (or match) sends PROXY
    /// headers to its upstreams (`proxy_protocol`), so the check speaks what the server expects.
    pub proxy_header: bool,
}

/// The checks of one set, running until dropped (a reload drops the checker of a set it
/// replaces; the new set's checker goes on with the same servers and their state).
#[derive(Debug)]
pub struct Checker {
    task: JoinHandle<()>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Checker {
    /// Starts checking `set` (inside a tokio runtime). The first round starts at once.
    pub fn start(set: Arc<Upstreams>, opts: CheckOptions) -> Checker {
        Checker {
            task: tokio::spawn(run(set, opts)),
        }
    }
}

async fn run(set: Arc<Upstreams>, opts: CheckOptions) {
    let hc = set.spec().health_check;
    let (interval, timeout, rise, fall) = match hc {
        Some(h) => (h.interval, h.timeout, h.rise, h.fall),
        None => {
            let limit = opts.connect_timeout.unwrap_or(RECOVERY_TIMEOUT);
            (RECOVERY_INTERVAL, RECOVERY_TIMEOUT.min(limit), 1, 1)
        }
    };
    let opts = Arc::new(opts);
    loop {
        let started = Instant::now();
        let targets = if hc.is_some() {
            // Host names are resolved at every round: a new address is checked (and used) at
            // once, one that is gone is dropped.
            match set.resolve().await {
                Ok(t) => t,
                Err(e) => {
                    debug!(route = %set.scope(), "health check: {e}");
                    set.targets()
                }
            }
        } else {
            set.targets()
        };
        let mut checks = JoinSet::new();
        for target in targets {
            if hc.is_none() && target.server.is_up() {
                continue;
            }
            checks.spawn(check(target, timeout, opts.clone()));
        }
        while let Some(done) = checks.join_next().await {
            if let Ok((target, seen)) = done {
                target.server.checked(seen, rise, fall);
            }
        }
        tokio::time::sleep_until((started + interval).into()).await;
    }
}

/// One check: connect within `timeout`, send the PROXY header if asked, close.
async fn check(
    target: Target,
    timeout: Duration,
    opts: Arc<CheckOptions>,
) -> (Target, Observation) {
    let started = Instant::now();
    let result = async {
        let mut stream = connect(target.addr, opts.interface.as_deref(), timeout)
            .await
            .map_err(|e| e.to_string())?
            .stream;
        if opts.proxy_header {
            let left = timeout.saturating_sub(started.elapsed());
            let sent = tokio::time::timeout(left, async {
                stream.write_all(&PROXY_V2_LOCAL).await?;
                stream.shutdown().await
            })
            .await;
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("sending the PROXY header: {e}")),
                Err(_) => return Err(format!("PROXY header not taken within {timeout:?}")),
            }
        } else {
            // A reset instead of a FIN: no TIME_WAIT left behind by every check.
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
        Ok(())
    }
    .await;
    let took = started.elapsed();
    let seen = Observation {
        ok: result.is_ok(),
        detail: match result {
            Ok(()) => format!("connected in {} ms", took.as_millis()),
            Err(e) => e,
        },
        at: Instant::now(),
    };
    (target, seen)
}
