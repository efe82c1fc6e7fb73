//! Connections from a trusted front proxy (`accept_proxy`, issue 13): the PROXY header is read
//! first, within the route's `peek_timeout` (which the peek after it shares), and names the
//! client the connection is for. From any other source nothing is parsed: the bytes are the
//! client's.
use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{reads_by::ReadsBy, state::RouteState};
use crate::{
    proxy_header::{self, Outcome, Parsed},
    registry::{Conn, Failure},
};

/// Who a connection is for, once any PROXY header is read.
pub(super) struct Front {
    /// The client: the header's source, or the peer itself.
    pub(super) client: SocketAddr,
    /// The address the client connected to, when a header said so (the front proxy's).
    pub(super) destination: Option<SocketAddr>,
    /// The front proxy, when its header named the client.
    pub(super) via: Option<SocketAddr>,
    /// The client's bytes that arrived with the header: the peek looks at them, the upstream
    /// gets them first.
    pub(super) early: Vec<u8>,
}

/// Reads the PROXY header, within what `reads_by` leaves, when `peer` is in the route's `accept_proxy`. `None`
/// when the header was refused and the connection is to be closed (counted and logged here).
pub(super) async fn front(
    client: &mut TcpStream,
    peer: SocketAddr,
    route: &RouteState,
    conn: &Conn,
    reads_by: &mut ReadsBy,
) -> Option<Front> {
    let mut front = Front {
        client: peer,
        destination: None,
        via: None,
        early: Vec::new(),
    };
    if !route.route.trusts(peer.ip()) {
        return Some(front);
    }
    let counters = &route.counters;
    let (parsed, early) = match proxy_header::read_header(client, reads_by.left()).await {
        Ok(read) => read,
        Err(rejected) => {
            let outcome = rejected.outcome();
            counters.proxy_header(outcome);
            counters.fail(Failure::ProxyHeader);
            warn!(
                route = %route.route.name, client = %peer, reason = %outcome.as_str(),
                "PROXY header refused: {rejected}; accept_proxy requires a v1 or v2 header \
                 from this source; closed"
            );
            return None;
        }
    };
    front.early = early;
    match parsed {
        Parsed::Proxied(origin) => {
            counters.proxy_header(Outcome::Proxied);
            conn.proxied(origin.source);
            front.client = origin.source;
            front.destination = Some(origin.destination);
            // As the prefixes matched it: an IPv4 front of a `[::]` listener is shown as IPv4.
            front.via = Some(SocketAddr::new(peer.ip().to_canonical(), peer.port()));
        }
        Parsed::Local => {
            counters.proxy_header(Outcome::Local);
            debug!(
                route = %route.route.name, client = %peer,
                "PROXY header LOCAL (the front proxy's own connection): forwarded as its own"
            );
        }
    }
    Some(front)
}
