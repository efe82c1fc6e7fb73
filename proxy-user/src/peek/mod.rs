//! Looking at a client's first bytes to choose a route's match: the TLS ClientHello (server
//! name, ALPN, ECH), the HTTP/1.x request head (Host), or neither.
//!
//! Everything here is pure and bounded: [`inspect`] takes the bytes read so far and says
//! whether they settle the question; [`read_head`] reads until they do. The bytes read are
//! returned so the caller writes them to the upstream before anything else.
mod decide;
pub mod http;
mod name;
mod rules;
pub mod tls;

use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

pub use decide::{decide, Decision, Outcome};
pub use name::{normalize, validate, NameError, NamePattern};
pub use rules::{first_match, Match};

/// The largest number of bytes read before deciding: a maximal ClientHello over its records.
pub const MAX_PEEK: usize = tls::MAX_CLIENT_HELLO + tls::MAX_RECORDS * 5;

/// What the first bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// A TLS handshake record.
    Tls,
    /// An HTTP/1.x request.
    Http,
    /// Anything else (SSH, a binary protocol, garbage).
    Other,
}

impl Protocol {
    /// The configuration's name for it (`protocol = "tls"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tls => "tls",
            Protocol::Http => "http",
            Protocol::Other => "other",
        }
    }

    /// Parses the configuration's name.
    pub fn parse(text: &str) -> Option<Protocol> {
        [Protocol::Tls, Protocol::Http, Protocol::Other]
            .into_iter()
            .find(|p| p.as_str() == text)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the first bytes said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peeked {
    /// The protocol detected.
    pub protocol: Protocol,
    /// The TLS server name (the outer one with ECH) or the HTTP host without its port,
    /// normalised (lower case, no trailing dot); non-ASCII bytes escaped.
    pub name: Option<String>,
    /// The ALPN protocol identifiers the client offered, in its order.
    pub alpn: Vec<String>,
    /// The ClientHello carries encrypted_client_hello: `name` is the public (outer) name.
    pub ech: bool,
}

impl Peeked {
    /// Nothing seen yet but the protocol.
    pub fn new(protocol: Protocol) -> Peeked {
        Peeked {
            protocol,
            name: None,
            alpn: Vec::new(),
            ech: false,
        }
    }
}

/// Why the first bytes cannot be routed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("a TLS record that is not a handshake record of 1 to 16,384 bytes")]
    TlsRecord,
    #[error("a ClientHello split over more than {} TLS records", tls::MAX_RECORDS)]
    TooManyRecords,
    #[error("the first TLS handshake message is not a ClientHello")]
    NotClientHello,
    #[error("the ClientHello cannot be parsed")]
    ClientHello,
    #[error("{claimed} bytes claimed or read, more than the {limit}-byte limit")]
    TooLarge { claimed: usize, limit: usize },
    #[error("the HTTP request head cannot be parsed")]
    HttpHead,
    #[error("the HTTP request head has more than 128 header lines")]
    TooManyHeaders,
    #[error("the HTTP request has more than one Host header")]
    DuplicateHost,
}

/// Where the bytes read so far leave the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Not enough bytes yet.
    NeedMore,
    /// Decided.
    Done(Peeked),
    /// The bytes claim a protocol but break it.
    Failed(Malformed),
}

/// Decides what `buf`, the client's first bytes, are, if they suffice.
pub fn inspect(buf: &[u8]) -> Progress {
    match buf {
        [] => Progress::NeedMore,
        // A handshake record (22) of TLS 1.x (major version 3).
        [22] | [22, 3, ..] => tls::inspect(buf),
        _ => match http::looks_like_http(buf) {
            Some(true) => http::inspect(buf),
            Some(false) => Progress::Done(Peeked::new(Protocol::Other)),
            None => Progress::NeedMore,
        },
    }
}

/// How reading the first bytes ended.
#[derive(Debug)]
pub enum Verdict {
    /// The bytes were enough to decide.
    Peeked(Peeked),
    /// The client sent nothing within the time limit (a server-first protocol).
    Silent,
    /// Bytes came, but not enough to decide, within the time limit.
    Stalled,
    /// The client closed before the bytes were enough to decide.
    Closed,
    /// The bytes cannot be routed on.
    Malformed(Malformed),
    /// Reading from the client failed.
    Failed(std::io::Error),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Peeked(p) => write!(f, "{}", p.protocol),
            Verdict::Silent => f.write_str("the client sent nothing before peek_timeout"),
            Verdict::Stalled => {
                f.write_str("the client's first bytes stopped short before peek_timeout")
            }
            Verdict::Closed => {
                f.write_str("the client closed before its first bytes were complete")
            }
            Verdict::Malformed(m) => write!(f, "malformed first bytes: {m}"),
            Verdict::Failed(e) => write!(f, "reading the client's first bytes failed: {e}"),
        }
    }
}

/// Reads a client's first bytes until they decide, fail, or `limit` passes, and returns them
/// with the verdict: every byte read must reach the upstream before the connection goes on.
pub async fn read_head<R: AsyncRead + Unpin>(
    client: &mut R,
    limit: Duration,
) -> (Vec<u8>, Verdict) {
    read_head_after(client, limit, Vec::with_capacity(2048)).await
}

/// [`read_head`] when the client's first bytes `early` were read already (they came after a
/// front proxy's PROXY header); they are looked at before anything more is read.
pub async fn read_head_after<R: AsyncRead + Unpin>(
    client: &mut R,
    limit: Duration,
    early: Vec<u8>,
) -> (Vec<u8>, Verdict) {
    let mut buf = early;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        // Empty bytes need more; early ones may settle the question without a read.
        match inspect(&buf) {
            Progress::NeedMore => {}
            Progress::Done(peeked) => return (buf, Verdict::Peeked(peeked)),
            Progress::Failed(m) => return (buf, Verdict::Malformed(m)),
        }
        if buf.len() >= MAX_PEEK {
            let limit = MAX_PEEK;
            let claimed = buf.len();
            return (
                buf,
                Verdict::Malformed(Malformed::TooLarge { claimed, limit }),
            );
        }
        // Read no further than the limit, so the caller forwards what was read and nothing more
        // is held here than the decision needs.
        let mut chunk = [0u8; 4096];
        let room = (MAX_PEEK - buf.len()).min(chunk.len());
        let read = tokio::time::timeout_at(deadline, client.read(&mut chunk[..room])).await;
        match read {
            Err(_elapsed) if buf.is_empty() => return (buf, Verdict::Silent),
            Err(_elapsed) => return (buf, Verdict::Stalled),
            Ok(Err(e)) => return (buf, Verdict::Failed(e)),
            Ok(Ok(0)) => return (buf, Verdict::Closed),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(test)]
mod tests;
