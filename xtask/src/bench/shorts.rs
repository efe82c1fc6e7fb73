//! The short-connection cases: many connections, each one small exchange, through a running
//! contender; their rate, every task's CPU per connection, and the TIME_WAIT sockets they leave
//! on the host (where the client and the forwarder live; the upstream is in the namespace).
use std::time::{Duration, Instant};

use anyhow::Result;

use super::{
    client::{self, Closer, Shorts},
    contenders::Instance,
    cpu,
    perf::{self, Perf},
    sys,
};

/// How many, how long, from how many threads.
#[derive(Clone, Copy)]
pub struct Amount {
    pub workers: usize,
    pub dur: Duration,
    pub max: usize,
}

/// The TIME_WAIT sockets on the host toward one instance's ports.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimeWait {
    /// Toward the upstream's port: the forwarder's upstream sockets (direct: the client's own).
    pub upstream_side: usize,
    /// The client's sockets toward the forwarder's port (direct: none, it has no forwarder).
    pub client: usize,
    /// The forwarder's accepted sockets (its client side).
    pub forwarder_client_side: usize,
}

impl TimeWait {
    /// Counts them now (none if `ss` fails: the count is a note, not a figure).
    pub fn count(inst: &Instance, upstream_port: u16) -> TimeWait {
        let listen_port = (inst.pid().is_some()).then_some(inst.addr.port());
        let ports: Vec<u16> = [Some(upstream_port), listen_port]
            .into_iter()
            .flatten()
            .collect();
        let mut tw = TimeWait::default();
        let found = sys::time_wait_ports(&ports).unwrap_or_else(|e| {
            eprintln!("bench: counting TIME_WAIT: {e:#}");
            Vec::new()
        });
        for (local, remote) in found {
            if remote == upstream_port {
                tw.upstream_side += 1;
            } else if Some(remote) == listen_port {
                tw.client += 1;
            } else if Some(local) == listen_port {
                tw.forwarder_client_side += 1;
            }
        }
        tw
    }

    /// The growth from `before` to `self`.
    pub fn since(self, before: TimeWait) -> TimeWait {
        TimeWait {
            upstream_side: self.upstream_side.saturating_sub(before.upstream_side),
            client: self.client.saturating_sub(before.client),
            forwarder_client_side: self
                .forwarder_client_side
                .saturating_sub(before.forwarder_client_side),
        }
    }
}

/// One case's outcome.
pub struct Case {
    pub shorts: Result<Shorts>,
    /// Every task's CPU over the case per connection done, in µs.
    pub cpu_us_per_conn: Option<f64>,
    /// TIME_WAIT toward the instance's ports right after the case (all cases so far on it).
    pub time_wait: TimeWait,
    /// How long the connections took, and the TIME_WAIT count after them.
    pub took: [Duration; 2],
}

/// Short connections through `inst` (whose upstream listens on `upstream_port`), closed as `how`
/// says; profiled as `name` when `perf` is given.
pub fn run(
    inst: &Instance,
    upstream_port: u16,
    how: Closer,
    amount: Amount,
    perf: Option<&Perf>,
    name: &str,
) -> Result<Case> {
    let t0 = Instant::now();
    let (shorts, secs) = perf::during(perf, name, inst.pid(), || {
        let all0 = cpu::snapshot();
        let shorts =
            client::short_connections(inst.target(), how, amount.workers, amount.dur, amount.max);
        Ok((shorts, all0.seconds_until(&cpu::snapshot())))
    })?;
    let t1 = Instant::now();
    let cpu_us_per_conn = shorts
        .as_ref()
        .ok()
        .filter(|s| s.done > 0)
        .map(|s| secs / s.done as f64 * 1e6);
    Ok(Case {
        shorts,
        cpu_us_per_conn,
        time_wait: TimeWait::count(inst, upstream_port),
        took: [t1 - t0, t1.elapsed()],
    })
}
