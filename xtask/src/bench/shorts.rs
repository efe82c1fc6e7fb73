//! The short-connection cases: many connections, each one small exchange, through a running
//! contender; their rate, every task's CPU per connection, and the TIME_WAIT sockets they leave
//! on the host (where the client and the forwarder live; the upstream is in the namespace).
use std::time::Duration;

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

/// What a case left in TIME_WAIT on the host, counted before and after it (the growth).
#[derive(Clone, Copy, Debug, Default)]
pub struct TimeWait {
    /// Toward the upstream's port: the forwarder's upstream sockets (direct: the client's own).
    pub upstream_side: usize,
    /// The client's sockets toward the forwarder's port (direct: none, it has no forwarder).
    pub client: usize,
    /// The forwarder's accepted sockets (its client side).
    pub forwarder_client_side: usize,
}

/// One case's outcome.
pub struct Case {
    pub shorts: Result<Shorts>,
    /// Every task's CPU over the case per connection done, in µs.
    pub cpu_us_per_conn: Option<f64>,
    pub time_wait: TimeWait,
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
    let listen_port = (inst.pid().is_some()).then_some(inst.addr.port());
    let count = || {
        let mut tw = TimeWait::default();
        for (local, remote) in sys::time_wait_ports() {
            if remote == upstream_port {
                tw.upstream_side += 1;
            } else if Some(remote) == listen_port {
                tw.client += 1;
            } else if Some(local) == listen_port {
                tw.forwarder_client_side += 1;
            }
        }
        tw
    };
    let tw0 = count();
    let (shorts, secs) = perf::during(perf, name, inst.pid(), || {
        let all0 = cpu::snapshot();
        let shorts =
            client::short_connections(inst.target(), how, amount.workers, amount.dur, amount.max);
        Ok((shorts, all0.seconds_until(&cpu::snapshot())))
    })?;
    let tw1 = count();
    let cpu_us_per_conn = shorts
        .as_ref()
        .ok()
        .filter(|s| s.done > 0)
        .map(|s| secs / s.done as f64 * 1e6);
    Ok(Case {
        shorts,
        cpu_us_per_conn,
        time_wait: TimeWait {
            upstream_side: tw1.upstream_side.saturating_sub(tw0.upstream_side),
            client: tw1.client.saturating_sub(tw0.client),
            forwarder_client_side: tw1
                .forwarder_client_side
                .saturating_sub(tw0.forwarder_client_side),
        },
    })
}
