//! The three data paths and the choice between them. Each carries half-close both ways, ends
//! the other side with an RST when one side resets, and loses, duplicates or reorders nothing.
use std::{fmt, io, time::Duration};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::ebpf::Sockmap;

mod bulk;
pub mod lanes;
mod pin;
pub mod sockmap;
pub mod userspace;

pub use sockmap::{Budget, Pool};

/// The data path that carries a connection's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPath {
    /// sk_skb verdict redirect between the two sockets; no payload crosses userspace.
    Sockmap,
    /// splice(2) through a pipe.
    Splice,
    /// A userspace buffer.
    Copy,
}

impl DataPath {
    /// Every path, in the order status and metrics list them.
    pub const ALL: [DataPath; 3] = [DataPath::Sockmap, DataPath::Splice, DataPath::Copy];

    /// The name in logs, status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DataPath::Sockmap => "sockmap",
            DataPath::Splice => "splice",
            DataPath::Copy => "copy",
        }
    }
}

impl fmt::Display for DataPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a connection ended.
#[derive(Debug)]
pub enum End {
    /// Both sides closed their write side; everything was delivered.
    Complete,
    /// The client reset the connection or failed; the upstream was reset.
    ClientFailed(io::Error),
    /// The upstream reset the connection or failed; the client was reset.
    UpstreamFailed(io::Error),
    /// spliced itself failed (a syscall on its side); both were reset.
    Ours(io::Error),
    /// The daemon stopped and the grace period ran out; both were reset.
    Shutdown,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Complete => f.write_str("complete"),
            End::ClientFailed(e) => write!(f, "client failed: {e}"),
            End::UpstreamFailed(e) => write!(f, "upstream failed: {e}"),
            End::Ours(e) => write!(f, "spliced failed: {e}"),
            End::Shutdown => f.write_str("closed at shutdown after the grace period"),
        }
    }
}

/// What a data path reports when the connection is over.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes carried client -> upstream.
    pub up: u64,
    /// Bytes carried upstream -> client.
    pub down: u64,
    /// How it ended.
    pub end: End,
}

impl Outcome {
    /// This outcome with `before` (up, down) bytes carried on an earlier path added.
    pub fn plus(self, before: (u64, u64)) -> Outcome {
        Outcome {
            up: self.up + before.0,
            down: self.down + before.1,
            end: self.end,
        }
    }

    /// An outcome that carried nothing.
    pub fn ended(end: End) -> Outcome {
        Outcome {
            up: 0,
            down: 0,
            end,
        }
    }
}

/// When an `auto` connection leaves the copy path: after 256 KiB (to splice, or to sockmap where
/// the bytes go out on loopback: see [`bulk`]), or 32 turns of the talk or 100 ms (to sockmap). Measured with 100-byte exchanges on the bench topology: the daemon
/// spends 260-300 µs of CPU per connection through sockmap against 200 µs through copy (kernel
/// networking included; the difference is map updates and psock set-up and tear-down), about
/// what copying 256 KiB costs, or a few round trips: each costs the copy path two wake-ups of
/// the daemon (a 64-byte round trip connection spent 40-60 ms of daemon CPU in its first 100
/// ms on copy, about 800 round trips, and none after it on sockmap). 32 turns (16 requests and
/// their responses) keep a short exchange, or a keep-alive connection with a few requests, on
/// copy, and move a chatty one on within milliseconds instead of 100; a bulk transfer turns a
/// few times at most, so it still reaches 256 KiB first and goes to splice.
const PROMOTION: userspace::Promotion = userspace::Promotion {
    bytes: userspace::BULK_AFTER,
    turns: 32,
    after: Duration::from_millis(100),
};

/// How a route's connections are carried: its configured mode resolved against what this
/// kernel offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Into sockmap at once (`mode = "sockmap"`).
    Sockmap,
    /// The copy path first (`auto`); a connection that moves 256 KiB in its first 100 ms goes
    /// on to splice, or to sockmap where most of its bytes go out on loopback (measured faster
    /// and cheaper per GB there, and slower on a veth: see [`bulk`]); one that turns 32 times
    /// (request, response) or lives longer goes to sockmap: no wakeup of the daemon per
    /// message, no pipes held. See docs/benchmarks.md.
    CopyThenSockmap,
    /// splice(2) (`splice`, or `auto` without the eBPF program).
    Splice,
    /// Copies (`copy`).
    Copy,
}

impl Plan {
    /// This plan for a connection that must not enter sockmap: splice instead.
    pub fn without_sockmap(self) -> Plan {
        match self {
            Plan::Sockmap | Plan::CopyThenSockmap => Plan::Splice,
            other => other,
        }
    }

    /// The path new connections of this plan are reported on.
    pub fn path(self) -> DataPath {
        match self {
            Plan::Sockmap | Plan::CopyThenSockmap => DataPath::Sockmap,
            Plan::Splice => DataPath::Splice,
            Plan::Copy => DataPath::Copy,
        }
    }
}

/// What a connection's data path needs besides its two sockets.
pub struct Context<'a> {
    /// The loaded verdict program; `None` when no route may use it.
    pub sockmap: Option<&'a Sockmap>,
    /// SO_SNDBUF for sockmap sockets (trap 9).
    pub send_buffer: Option<usize>,
    /// The route's backpressure allowance (trap 8).
    pub budget: &'a Budget,
    /// Fires at the end of the grace period, or when the connection idled out.
    pub cancel: &'a CancellationToken,
    /// The route's name, for log lines.
    pub route: &'a str,
}

/// Runs the connection on `plan`'s data path; returns the path it ended on and what it carried
/// on all of them. Sockmap hands connections it cannot take to splice.
pub async fn carry(
    plan: Plan,
    cx: &Context<'_>,
    client: TcpStream,
    upstream: TcpStream,
) -> (DataPath, Outcome) {
    match (plan, cx.sockmap) {
        (Plan::Sockmap, Some(sockmap)) => kernel(sockmap, cx, client, upstream, (0, 0)).await,
        (Plan::CopyThenSockmap, Some(sockmap)) => {
            match userspace::copy_then_promote(client, upstream, PROMOTION, cx.cancel).await {
                userspace::Started::Done(outcome) => (DataPath::Copy, outcome),
                userspace::Started::Promote {
                    client,
                    upstream,
                    up,
                    down,
                    by: userspace::Reached::Bytes,
                } => {
                    let addrs = |s: &TcpStream| Ok((s.local_addr()?, s.peer_addr()?));
                    let to = bulk::path(up, down, || addrs(&client), || addrs(&upstream));
                    tracing::debug!(route = cx.route, up, down, "bulk: from copy to {to}");
                    if to == DataPath::Sockmap {
                        return kernel(sockmap, cx, client, upstream, (up, down)).await;
                    }
                    let o = lanes::splice(client, upstream, cx.cancel).await;
                    (DataPath::Splice, o.plus((up, down)))
                }
                userspace::Started::Promote {
                    client,
                    upstream,
                    up,
                    down,
                    by: by @ (userspace::Reached::Age | userspace::Reached::Turns),
                } => {
                    tracing::debug!(
                        route = cx.route,
                        up,
                        down,
                        "{}: from copy to sockmap",
                        if by == userspace::Reached::Age {
                            "long-lived"
                        } else {
                            "many small messages"
                        }
                    );
                    kernel(sockmap, cx, client, upstream, (up, down)).await
                }
            }
        }
        (Plan::Copy, _) => (
            DataPath::Copy,
            userspace::copy(client, upstream, cx.cancel).await,
        ),
        // Sockmap without a loaded program cannot happen (start refuses it); splice is safe.
        _ => (
            DataPath::Splice,
            userspace::splice(client, upstream, cx.cancel).await,
        ),
    }
}

/// The sockmap path for sockets that carried `before` (up, down) bytes on the copy path.
async fn kernel(
    sockmap: &Sockmap,
    cx: &Context<'_>,
    client: TcpStream,
    upstream: TcpStream,
    before: (u64, u64),
) -> (DataPath, Outcome) {
    let add = |path, o: Outcome| (path, o.plus(before));
    let ours = |path, e| add(path, Outcome::ended(End::Ours(e)));
    // Out of tokio's epoll: the sockets' data wakeups would be spurious (trap 7).
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => return ours(DataPath::Sockmap, e),
    };
    let run = sockmap::run(
        sockmap,
        client,
        upstream,
        cx.send_buffer,
        cx.budget,
        cx.cancel,
    );
    match run.await {
        Ok(outcome) => add(DataPath::Sockmap, outcome),
        Err(declined) => {
            tracing::debug!(
                route = cx.route,
                "sockmap declined the connection ({}); using splice",
                declined.why
            );
            match (
                TcpStream::from_std(declined.client),
                TcpStream::from_std(declined.upstream),
            ) {
                (Ok(c), Ok(u)) => add(DataPath::Splice, userspace::splice(c, u, cx.cancel).await),
                (Err(e), _) | (_, Err(e)) => ours(DataPath::Splice, e),
            }
        }
    }
}
