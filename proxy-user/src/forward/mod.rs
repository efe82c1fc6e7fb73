//! The three data paths. Each carries half-close both ways, ends the other side with an RST
//! when one side resets, and loses, duplicates or reorders nothing.
use std::{fmt, io};

use tokio_util::sync::CancellationToken;

use crate::{server::DataPath, sockmap::Sockmap};

pub mod sockmap;
pub mod userspace;

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

/// Runs a connection on the sockmap path: straight away, or (with a `promotion`) first on the
/// copy path and in the kernel once it has moved enough bytes or lived long enough. A
/// connection sockmap cannot take goes to splice. Returns the path it ended on and what it
/// carried on all of them.
#[allow(clippy::too_many_arguments)]
pub async fn kernel(
    sockmap: &Sockmap,
    client: tokio::net::TcpStream,
    upstream: tokio::net::TcpStream,
    send_buffer: Option<usize>,
    budget: &sockmap::Budget,
    promotion: Option<userspace::Promotion>,
    cancel: &CancellationToken,
    route: &str,
) -> (DataPath, Outcome) {
    let (client, upstream, before) = match promotion {
        None => (client, upstream, (0, 0)),
        Some(promotion) => {
            match userspace::copy_then_promote(client, upstream, promotion, cancel).await {
                userspace::Started::Done(outcome) => return (DataPath::Copy, outcome),
                userspace::Started::Promote {
                    client,
                    upstream,
                    up,
                    down,
                } => {
                    tracing::debug!(route, up, down, "promoted from copy to sockmap");
                    (client, upstream, (up, down))
                }
            }
        }
    };
    let add = |path, o: Outcome| {
        (
            path,
            Outcome {
                up: o.up + before.0,
                down: o.down + before.1,
                end: o.end,
            },
        )
    };
    let ours = |path, e| {
        add(
            path,
            Outcome {
                up: 0,
                down: 0,
                end: End::Ours(e),
            },
        )
    };
    // Out of tokio's epoll: the sockets' data wakeups would be spurious (trap 7).
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => return ours(DataPath::Sockmap, e),
    };
    match sockmap::run(
        sockmap,
        client,
        upstream,
        send_buffer,
        budget,
        before,
        cancel,
    )
    .await
    {
        Ok(outcome) => add(DataPath::Sockmap, outcome),
        Err(declined) => {
            tracing::debug!(
                route,
                "sockmap declined the connection ({}); using splice",
                declined.why
            );
            match (
                tokio::net::TcpStream::from_std(declined.client),
                tokio::net::TcpStream::from_std(declined.upstream),
            ) {
                (Ok(c), Ok(u)) => add(
                    DataPath::Splice,
                    userspace::run(userspace::Kind::Splice, c, u, cancel).await,
                ),
                (Err(e), _) | (_, Err(e)) => ours(DataPath::Splice, e),
            }
        }
    }
}
