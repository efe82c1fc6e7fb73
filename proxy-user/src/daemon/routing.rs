//! Choosing a route's match from the client's first bytes (issue 12): the peek, the choice, and
//! what a refused client gets (a TLS alert, a 421, a close), counted and logged.
use std::{net::SocketAddr, os::fd::AsRawFd};

use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::{info, warn};

use super::state::RouteState;
use crate::peek::{self, Decision, Outcome, Peeked, Protocol, Verdict};

/// Where a connection goes and what has to be written to its upstream first.
pub(super) struct Chosen {
    /// The match that applies (index in the route's matches); `None`: the route's upstream.
    pub(super) rule: Option<usize>,
    /// The bytes read to decide: the upstream gets them before anything else.
    pub(super) head: Vec<u8>,
    /// What the peek saw, when it saw something.
    pub(super) seen: Option<Peeked>,
    pub(super) outcome: Option<Outcome>,
    /// How many of the bytes written to the upstream before the data path were the client's.
    pub(super) client_bytes: usize,
    /// The last read stopped inside an skb (the client kept sending): sockmap would hand that
    /// skb to the verdict whole, so this connection must not enter it.
    pub(super) mid_skb: bool,
}

impl Chosen {
    /// `rule=match[1] sni=blog.example.com`: the log fields, and the status column.
    pub(super) fn describe(&self) -> String {
        let mut text = match self.rule {
            Some(i) => format!("rule=match[{i}]"),
            None => "rule=default".to_owned(),
        };
        if let Some(outcome) = self.outcome {
            text += &format!(" peek={}", outcome.as_str());
        }
        if let Some(seen) = &self.seen {
            text += &name_fields(seen);
        }
        text
    }
}

/// ` sni=NAME` or ` host=NAME` (and ` ech=outer` with ECH), or nothing.
fn name_fields(seen: &Peeked) -> String {
    let key = match seen.protocol {
        Protocol::Tls => "sni",
        Protocol::Http => "host",
        Protocol::Other => return " protocol=other".to_owned(),
    };
    let mut text = match &seen.name {
        Some(name) => format!(" {key}={name}"),
        None => format!(" {key}=(none)"),
    };
    if seen.ech {
        text += " ech=outer";
    }
    text
}

/// Peeks when the route has matches and decides; `None` when the connection was refused or
/// closed here (already counted and logged). `early`: the client's first bytes, read already
/// (after a front proxy's PROXY header); they are the head of the peek, or of the connection.
pub(super) async fn choose(
    client: &mut TcpStream,
    peer: SocketAddr,
    route: &RouteState,
    early: Vec<u8>,
) -> Option<Chosen> {
    let r = &route.route;
    if r.matches.is_empty() {
        return Some(Chosen {
            rule: None,
            head: early,
            seen: None,
            outcome: None,
            client_bytes: 0,
            mid_skb: false,
        });
    }
    let (mut head, verdict) = peek::read_head_after(client, r.peek_timeout, early).await;
    let mid_skb = matches!(verdict, Verdict::Peeked(_)) && !take_partial_skb(client, &mut head);
    let rules = r.matches.iter().map(|m| &m.rule);
    let (decision, outcome) = peek::decide(&verdict, rules, r.has_default());
    route.counters.peeked(outcome);
    let seen = match &verdict {
        Verdict::Peeked(p) => Some(p.clone()),
        _ => None,
    };
    let mut chosen = Chosen {
        rule: None,
        head,
        seen,
        outcome: Some(outcome),
        client_bytes: 0,
        mid_skb,
    };
    match decision {
        Decision::Matched(i) => {
            chosen.rule = Some(i);
            route.counters.matched(i);
            Some(chosen)
        }
        Decision::Default => Some(chosen),
        Decision::Refuse { reply } => {
            if let Some(reply) = reply {
                // Best effort: the client may be gone already.
                let _ = client.write_all(reply).await;
                let _ = client.shutdown().await;
            }
            info!(
                route = %r.name, client = %peer, "no route for this connection: {}; no match and no default upstream; closed",
                chosen.describe()
            );
            None
        }
        Decision::Close => {
            warn!(
                route = %r.name, client = %peer, peek = %outcome.as_str(), bytes = chosen.head.len(),
                "closed before routing: {verdict}"
            );
            None
        }
    }
}

/// Kernel trap: the peek's last read may have taken part of an skb, and a socket entering the
/// sockmap hands a partly read skb to the verdict whole (`tcp_read_skb`), so the part already
/// read would reach the upstream twice (measured: 4,096 bytes doubled). Reading exactly the
/// bytes queued (`SIOCINQ`) is not enough: data arriving meanwhile is appended to the queue's
/// last skb (`tcp_try_coalesce`), so that read can still stop inside it (measured behind a
/// front proxy streaming 64 MiB: 32,340 bytes doubled). A read that returns less than it asked
/// for has emptied the queue (`tcp_recvmsg` stops early only then), and whatever arrives later
/// comes in new skbs. So: read until such a read, at most [`DRAIN_LIMIT`] bytes; `false` when
/// the client kept the queue full that long (the connection then stays out of sockmap). The
/// bytes join the head written to the upstream.
pub(super) fn take_partial_skb(client: &TcpStream, head: &mut Vec<u8>) -> bool {
    const CHUNK: usize = 64 * 1024;
    let start = head.len();
    while head.len() - start < DRAIN_LIMIT {
        let at = head.len();
        head.resize(at + CHUNK, 0);
        let read = crate::sockopt::recv_nonblocking(client.as_raw_fd(), &mut head[at..]);
        let n = match read {
            Ok(Some(n)) => n,
            // Nothing queued (or an error the data path will meet again): no partial skb.
            Ok(None) | Err(_) => 0,
        };
        head.truncate(at + n);
        if n < CHUNK {
            return true;
        }
    }
    false
}

/// The most [`take_partial_skb`] reads past the peek: a connection's worth of the copy path's
/// buffer.
const DRAIN_LIMIT: usize = 256 * 1024;
