//! One connection: the upstream dial, the data path, the idle watchdog, the log line.
use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    proxied,
    reads_by::ReadsBy,
    routing,
    state::{Live, RouteState, Shared},
};
use crate::{
    forward::{self, DataPath, End, Outcome, Plan},
    proxy_header,
    registry::{Conn, Failure},
    sockopt,
    upstream::{self, ConnectError, DialError, DialOptions, Lease},
};

/// The failure reason a dial error is counted under.
fn dial_failure(e: &DialError) -> Failure {
    match e {
        DialError::Resolve(_) => Failure::Resolve,
        DialError::NoUpstream { .. } => Failure::NoUpstream,
        DialError::Ours(ConnectError::Interface { .. }) => Failure::Interface,
        DialError::Ours(_) => Failure::Spliced,
    }
}

/// Serves one accepted connection to its end.
pub(super) async fn run(
    mut client: TcpStream,
    peer: SocketAddr,
    route: Arc<RouteState>,
    shared: Arc<Shared>,
    _live: Live,
) {
    let rc = &route.counters;
    let entry = shared.registry.add(&route.route.name, peer);
    let started = Instant::now();
    // The connection's own token from the start: waiting on `close_all` itself registered a
    // waiter in the daemon's one token (a lock every connection shares) and dropped it again.
    let cancel = shared.close_all.child_token();
    let opened = tokio::select! {
        r = open(&mut client, peer, &route, &entry.conn) => r,
        () = cancel.cancelled() => {
            rc.fail(Failure::Shutdown);
            return;
        }
    };
    let Some(Opened {
        upstream,
        addr: upstream_addr,
        lease: _lease,
        chosen,
        plan,
        client: origin,
        via,
    }) = opened
    else {
        return;
    };
    // The client's TCP_NODELAY came from the listener (see `listen::accept_loop`).
    let _ = upstream.set_nodelay(true);
    entry
        .conn
        .established(&client, &upstream, upstream_addr, plan.path());
    let routing = (!route.route.matches.is_empty()).then(|| chosen.describe());
    if let Some(text) = &routing {
        entry.conn.routed(text.clone());
    }
    let idled = AtomicBool::new(false);
    let cx = forward::Context {
        sockmap: shared.sockmap.as_deref(),
        send_buffer: shared.send_buffer,
        budget: &route.budget,
        cancel: &cancel,
        route: &route.route.name,
    };
    let (path, mut outcome) = tokio::select! {
        r = forward::carry(plan, &cx, client, upstream) => r,
        () = watchdog(&route, &shared, &entry.conn, &cancel, &idled) => unreachable!("the watchdog never returns"),
    };
    drop(entry);
    // The client's bytes read before the data path took over were its first ones.
    outcome.up += chosen.client_bytes as u64;
    let idled = idled.load(Ordering::Relaxed);
    let ended = Ended {
        peer: origin,
        via,
        upstream: upstream_addr,
        path,
        elapsed: started.elapsed(),
        routing,
    };
    report(&route, ended, outcome, idled);
}

/// A connection set up to its data path.
struct Opened {
    upstream: TcpStream,
    addr: SocketAddr,
    lease: Lease,
    chosen: routing::Chosen,
    /// The data path to take: the match's or route's plan, or splice in its stead (see
    /// [`end_reads_on_skb_boundary`]).
    plan: Plan,
    /// The client: a trusted front proxy's PROXY header's source, or the peer.
    client: SocketAddr,
    /// The front proxy whose header named the client.
    via: Option<SocketAddr>,
}

/// Reads a trusted front proxy's PROXY header, routes (peeking if the route has matches), dials
/// the chosen upstream and writes to it what must precede the client's bytes: the PROXY header,
/// then the bytes read so far, which end on an skb boundary ([`end_reads_on_skb_boundary`]).
/// With sockmap this happens before the sockets enter the map, so those bytes cannot overtake
/// them. `None` when the connection ended here (refused, or the upstream failed; counted and
/// logged).
async fn open(
    client: &mut TcpStream,
    peer: SocketAddr,
    route: &RouteState,
    conn: &Conn,
) -> Option<Opened> {
    let mut reads_by = ReadsBy::new(route.route.peek_timeout);
    let front = proxied::front(client, peer, route, conn, &mut reads_by).await?;
    // From here on the client is the one the header named.
    let peer = front.client;
    let mut chosen = routing::choose(client, peer, route, front.early, &mut reads_by).await?;
    let target = route.route.target(chosen.rule)?;
    let opts = DialOptions {
        connect_timeout: target.connect_timeout,
        interface: target.interface,
    };
    // The one dial: the chosen match's server set, or the route's.
    let dialed = upstream::dial(route.upstreams_of(chosen.rule), peer, &opts).await;
    let (mut upstream, addr, lease) = match dialed {
        Ok(d) => {
            let to = d.lease.server().name();
            for failed in &d.failed {
                info!(route = %route.route.name, client = %peer, "upstream server skipped: {failed}; went on to {to}");
            }
            (d.stream, d.addr, d.lease)
        }
        Err(e) => {
            route.counters.fail(dial_failure(&e));
            // Reset, so the client does not take an empty reply for a successful one.
            let _ = sockopt::set_linger_zero(client);
            warn!(
                route = %route.route.name, client = %peer, upstream = %target.upstream,
                "upstream failed: {e}; client connection reset"
            );
            return None;
        }
    };
    let mut first = match target.proxy_protocol {
        Some(version) => {
            let destination = front.destination.or(client.local_addr().ok());
            let origin = proxy_header::Origin {
                source: peer,
                destination: destination.unwrap_or(peer),
            };
            proxy_header(version, origin, &chosen)
        }
        None => Vec::new(),
    };
    let plan = last_read(client, route, &mut chosen, peer);
    chosen.client_bytes = chosen.head.len();
    first.append(&mut chosen.head);
    if !first.is_empty() {
        if let Err(e) = upstream.write_all(&first).await {
            route.counters.fail(Failure::Upstream);
            let _ = sockopt::set_linger_zero(client);
            warn!(
                route = %route.route.name, client = %peer, upstream = %addr,
                "upstream failed: writing the client's first {} bytes: {e}; client connection reset",
                first.len()
            );
            return None;
        }
    }
    Some(Opened {
        upstream,
        addr,
        lease,
        chosen,
        plan,
        client: peer,
        via: front.via,
    })
}

/// The last read of the client before its data path, and that path: the route's (or match's)
/// plan, or splice where the read could not end on an skb boundary.
fn last_read(
    client: &TcpStream,
    route: &RouteState,
    chosen: &mut routing::Chosen,
    peer: SocketAddr,
) -> Plan {
    let planned = route.plan_of(chosen.rule);
    // A route that neither peeks nor takes PROXY headers has read nothing of the client: its
    // queue holds whole skbs, and the two system calls that would ask the kernel are saved.
    let reads_first = !route.route.matches.is_empty() || !route.route.accept_proxy.is_empty();
    if !reads_first {
        return planned;
    }
    let plan = end_reads_on_skb_boundary(client, &mut chosen.head, planned);
    if plan != planned {
        debug!(route = %route.route.name, client = %peer, "the client kept sending while it was read before the data path: splice, not sockmap");
    }
    plan
}

/// Kernel trap (docs/sockmap.md trap 11, *read before the insert*): a socket entering the
/// sockmap hands a partly read skb to the verdict whole (`tcp_read_skb`), so when userspace's
/// last read of the client (a front proxy's PROXY header, the routing peek, or any other read
/// before the data path) stopped inside an skb, the part already read would reach the upstream
/// twice (measured: 4,096 bytes doubled after the peek). Reading exactly the bytes queued
/// (`SIOCINQ`) is not enough: data arriving meanwhile is appended to the queue's last skb
/// (`tcp_try_coalesce`), so that read can still stop inside it (measured behind a front proxy
/// streaming 64 MiB: 32,340 bytes doubled). A read that returns less than it asked for has
/// emptied the queue (`tcp_recvmsg` stops early only then), and whatever arrives later comes in
/// new skbs. So, when `plan` may enter sockmap and userspace has read any of the client's
/// bytes: read until such a read, at most [`DRAIN_LIMIT`] bytes, appended to `head` (written
/// to the upstream first). Returns `plan`, or splice in its stead when the client kept the
/// queue full that long.
fn end_reads_on_skb_boundary(client: &impl AsRawFd, head: &mut Vec<u8>, plan: Plan) -> Plan {
    const CHUNK: usize = 64 * 1024;
    // Copy and splice never insert; a client not read from yet has only whole skbs queued.
    if plan == plan.without_sockmap() || !read_any(client) {
        return plan;
    }
    let start = head.len();
    while head.len() - start < DRAIN_LIMIT {
        let n = match sockopt::recv_append(client.as_raw_fd(), head, CHUNK) {
            Ok(Some(n)) => n,
            // Nothing queued (or an error the data path will meet again): no partial skb.
            Ok(None) | Err(_) => 0,
        };
        if n < CHUNK {
            return plan;
        }
    }
    plan.without_sockmap()
}

/// The most [`end_reads_on_skb_boundary`] reads: a connection's worth of the copy path's
/// buffer.
const DRAIN_LIMIT: usize = 256 * 1024;

/// Whether userspace has read any of the client's bytes: the kernel has received more than it
/// still queues (`tcpi_bytes_received` against `SIOCINQ`). The queue is read first, so a byte
/// (or the FIN, which `bytes_received` counts and `SIOCINQ` does not) arriving in between can
/// only make this say yes, which costs one read; so does an error.
fn read_any(client: &impl AsRawFd) -> bool {
    let queued = sockopt::inq(client);
    let received = sockopt::tcp_info(client).map(|info| info.bytes_received);
    match (queued, received) {
        (Ok(queued), Ok(received)) => received > queued,
        _ => true,
    }
}

/// The PROXY header for this connection: the client and the address it connected to (a front
/// proxy's header's, or ours), and for v2 the name the peek saw and the ALPN protocol when the
/// client offered only one (the only case the negotiated one is known without terminating TLS).
fn proxy_header(
    version: proxy_header::Version,
    origin: proxy_header::Origin,
    chosen: &routing::Chosen,
) -> Vec<u8> {
    let seen = chosen.seen.as_ref();
    let alpn = seen
        .filter(|s| s.alpn.len() == 1)
        .map(|s| s.alpn[0].as_str());
    let header_seen = proxy_header::Seen {
        authority: seen.and_then(|s| s.name.as_deref()),
        alpn,
    };
    proxy_header::encode(version, origin, header_seen)
}

/// Cancels the connection once it carried no data either way for the route's `idle_timeout`;
/// never returns.
async fn watchdog(
    route: &RouteState,
    shared: &Shared,
    conn: &Conn,
    cancel: &CancellationToken,
    idled: &AtomicBool,
) {
    if let Some(limit) = route.route.idle_timeout {
        loop {
            let idle = conn.sample(shared.sockmap.as_deref()).idle;
            if idle >= limit {
                idled.store(true, Ordering::Relaxed);
                cancel.cancel();
                break;
            }
            // The earliest the connection can have been idle for `limit`.
            tokio::time::sleep((limit - idle).max(Duration::from_millis(10))).await;
        }
    }
    std::future::pending::<()>().await
}

/// What the log line says of a connection besides its outcome.
struct Ended {
    peer: SocketAddr,
    /// The front proxy whose PROXY header named `peer`.
    via: Option<SocketAddr>,
    upstream: SocketAddr,
    path: DataPath,
    elapsed: Duration,
    /// The match and name routing saw, on routes with matches.
    routing: Option<String>,
}

/// Counts the closed connection and logs its line: info for an ordinary end, warn for ours.
fn report(route: &RouteState, ended: Ended, outcome: Outcome, idled: bool) {
    let rc = &route.counters;
    let Outcome { up, down, end } = outcome;
    rc.closed(ended.path, up, down);
    let idled = idled && matches!(end, End::Shutdown);
    let failure = match &end {
        End::Complete => None,
        End::ClientFailed(_) => Some(Failure::Client),
        End::UpstreamFailed(_) => Some(Failure::Upstream),
        End::Ours(_) => Some(Failure::Spliced),
        End::Shutdown if idled => Some(Failure::IdleTimeout),
        End::Shutdown => Some(Failure::Shutdown),
    };
    if let Some(f) = failure {
        rc.fail(f);
    }
    // Formatted into the line itself (no String of its own) unless the idle timeout ended it.
    let idle_end = match (idled, route.route.idle_timeout) {
        (true, Some(t)) => Some(format!(
            "idle timeout: no data either way for {t:?}; both sides reset"
        )),
        _ => None,
    };
    let end: &dyn std::fmt::Display = match &idle_end {
        Some(text) => text,
        None => &end,
    };
    let Ended {
        peer,
        via,
        upstream,
        path,
        elapsed,
        routing,
    } = ended;
    let mut routing = routing.unwrap_or_default();
    if let Some(via) = via {
        routing += &format!("{}via={via}", if routing.is_empty() { "" } else { " " });
    }
    let name = &route.route.name;
    macro_rules! log_line {
        ($level:ident) => {
            $level!(
                route = %name, client = %peer, upstream = %upstream, path = %path,
                bytes_up = up, bytes_down = down, duration_ms = elapsed.as_millis() as u64,
                end = %end, "connection closed{}{routing}", if routing.is_empty() { "" } else { ": " }
            )
        };
    }
    match failure {
        None | Some(Failure::Client | Failure::Upstream | Failure::IdleTimeout) => log_line!(info),
        _ => log_line!(warn),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{TcpListener, TcpStream},
        time::{Duration, Instant},
    };

    use super::*;

    /// A connected pair on loopback: (the client's end, ours). `rcvbuf`: our receive buffer.
    fn pair(rcvbuf: usize) -> (TcpStream, TcpStream) {
        let listener =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        listener.set_recv_buffer_size(rcvbuf).unwrap();
        listener
            .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        listener.listen(1).unwrap();
        let listener: TcpListener = listener.into();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        (client, ours)
    }

    /// Waits (at most 5 s) until `at_least` bytes are queued on `s`.
    fn queued(s: &TcpStream, at_least: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while sockopt::inq(s).unwrap() < at_least {
            assert!(Instant::now() < deadline, "{at_least} bytes never queued");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_client_not_read_from_is_left_alone() {
        let (mut client, ours) = pair(1 << 20);
        client.write_all(&[7; 100_000]).unwrap();
        queued(&ours, 100_000);
        let mut head = Vec::new();
        let plan = end_reads_on_skb_boundary(&ours, &mut head, Plan::Sockmap);
        assert_eq!(plan, Plan::Sockmap);
        assert!(head.is_empty());
        assert_eq!(sockopt::inq(&ours).unwrap(), 100_000);
    }

    #[test]
    fn a_read_inside_an_skb_is_read_on_to_the_empty_queue() {
        for plan in [Plan::Sockmap, Plan::CopyThenSockmap] {
            let (mut client, mut ours) = pair(1 << 20);
            let sent: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
            client.write_all(&sent).unwrap();
            queued(&ours, 100_000);
            let mut head = vec![0; 10];
            ours.read_exact(&mut head).unwrap();
            assert_eq!(end_reads_on_skb_boundary(&ours, &mut head, plan), plan);
            assert_eq!(head, sent);
            assert_eq!(sockopt::inq(&ours).unwrap(), 0);
        }
    }

    #[test]
    fn copy_and_splice_are_not_read_on() {
        for plan in [Plan::Copy, Plan::Splice] {
            let (mut client, mut ours) = pair(1 << 20);
            client.write_all(&[7; 100_000]).unwrap();
            queued(&ours, 100_000);
            let mut head = vec![0; 10];
            ours.read_exact(&mut head).unwrap();
            assert_eq!(end_reads_on_skb_boundary(&ours, &mut head, plan), plan);
            assert_eq!(head.len(), 10);
        }
    }

    #[test]
    fn a_queue_that_stays_full_goes_to_splice() {
        let (mut client, mut ours) = pair(4 << 20);
        let more = DRAIN_LIMIT + 100_000;
        client.write_all(&vec![7; more]).unwrap();
        queued(&ours, more as u64);
        let mut head = vec![0; 10];
        ours.read_exact(&mut head).unwrap();
        let plan = end_reads_on_skb_boundary(&ours, &mut head, Plan::CopyThenSockmap);
        assert_eq!(plan, Plan::Splice);
        assert_eq!(head.len(), 10 + DRAIN_LIMIT);
    }
}
