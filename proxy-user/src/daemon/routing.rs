//! Choosing a route's match from the client's first bytes (issue 12): the peek, the choice, and
//! what a refused client gets (a TLS alert, a 421, a close), counted and logged.
use std::net::SocketAddr;

use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::{info, warn};

use super::{reads_by::ReadsBy, state::RouteState};
use crate::peek::{self, Decision, Outcome, Peeked, Protocol, Verdict};

/// Where a connection goes and what has to be written to its upstream first.
pub(super) struct Chosen {
    /// The match that applies (index in the route's matches); `None`: the route's upstream.
    pub(super) rule: Option<usize>,
    /// The client's bytes read before the data path (to decide, and any after them that
    /// `connection::open` reads to end on an skb boundary): the upstream gets them first.
    pub(super) head: Vec<u8>,
    /// What the peek saw, when it saw something.
    pub(super) seen: Option<Peeked>,
    pub(super) outcome: Option<Outcome>,
    /// How many of the bytes written to the upstream before the data path were the client's.
    pub(super) client_bytes: usize,
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

/// Peeks (within what `reads_by` leaves) when the route has matches and decides; `None` when
/// the connection was refused or closed here (already counted and logged). `early`: the
/// client's first bytes, read already (after a front proxy's PROXY header); they are the head
/// of the peek, or of the connection.
pub(super) async fn choose(
    client: &mut TcpStream,
    peer: SocketAddr,
    route: &RouteState,
    early: Vec<u8>,
    reads_by: &mut ReadsBy,
) -> Option<Chosen> {
    let r = &route.route;
    if r.matches.is_empty() {
        return Some(Chosen {
            rule: None,
            head: early,
            seen: None,
            outcome: None,
            client_bytes: 0,
        });
    }
    let (head, verdict) = peek::read_head_after(client, reads_by.left(), early).await;
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
