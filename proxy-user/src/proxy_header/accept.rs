//! Reading the header a trusted front proxy sends first: v1 or v2, detected, bounded in size
//! and time; the bytes after it are the client's and are handed back, not lost.
use std::time::Duration;

use ppp::v2;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::Origin;

/// The longest v1 header, CRLF included (the specification's bound).
pub const MAX_V1: usize = 107;
/// The most v2 address and TLV bytes accepted: the largest address block (216, AF_UNIX) and
/// 4 KiB of TLVs.
pub const MAX_V2_PAYLOAD: usize = 216 + 4096;
const V2_FIXED: usize = 16;
const V1_PREFIX: &[u8] = b"PROXY ";

/// A header read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A relayed connection: these are the real ends.
    Proxied(Origin),
    /// v2 `LOCAL` (the front proxy's own connection, a health check) or v1 `UNKNOWN`: the
    /// connection is taken as the front proxy's own.
    Local,
}

/// Why a header was not accepted; the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("no PROXY header: the first bytes are neither \"PROXY \" (v1) nor the v2 signature")]
    Missing,
    #[error("a v1 header without CRLF within {MAX_V1} bytes")]
    V1TooLong,
    #[error("a broken v1 header: {0}")]
    V1(String),
    #[error("a v2 header announcing {0} bytes of addresses and TLVs, more than {MAX_V2_PAYLOAD}")]
    V2TooLong(usize),
    #[error("a broken v2 header: {0}")]
    V2(String),
    #[error("the front proxy closed before its header was complete ({0} bytes)")]
    Truncated(usize),
    #[error("no complete header within {0:?}")]
    Timeout(Duration),
    #[error("reading the header failed: {0}")]
    Read(String),
}

impl Rejected {
    /// The counter this rejection is counted under.
    pub fn outcome(&self) -> super::Outcome {
        use super::Outcome;
        match self {
            Rejected::Missing => Outcome::Missing,
            Rejected::V1TooLong | Rejected::V2TooLong(_) => Outcome::TooLong,
            Rejected::V1(_) | Rejected::V2(_) => Outcome::Malformed,
            Rejected::Truncated(_) => Outcome::Truncated,
            Rejected::Timeout(_) => Outcome::Timeout,
            Rejected::Read(_) => Outcome::ReadError,
        }
    }
}

/// Where the bytes read so far leave the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    NeedMore,
    /// The header, and its length: the bytes after it are the client's.
    Done(Parsed, usize),
    Failed(Rejected),
}

/// Looks at the first bytes of a connection from a trusted source.
pub fn parse(buf: &[u8]) -> Progress {
    let signature = v2::PROTOCOL_PREFIX;
    let n = buf.len().min(signature.len());
    if buf[..n] == signature[..n] {
        return if n < signature.len() {
            Progress::NeedMore
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] {
        return if n < V1_PREFIX.len() {
            Progress::NeedMore
        } else {
            parse_v1(buf)
        };
    }
    Progress::Failed(Rejected::Missing)
}

fn parse_v1(buf: &[u8]) -> Progress {
    let window = &buf[..buf.len().min(MAX_V1)];
    let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX_V1 {
            Progress::Failed(Rejected::V1TooLong)
        } else {
            Progress::NeedMore
        };
    };
    let len = cr + 2;
    match ppp::v1::Header::try_from(&buf[..len]) {
        Ok(header) => {
            let parsed = match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => Parsed::Proxied(Origin {
                    source: (a.source_address, a.source_port).into(),
                    destination: (a.destination_address, a.destination_port).into(),
                }),
                ppp::v1::Addresses::Tcp6(a) => Parsed::Proxied(Origin {
                    source: (a.source_address, a.source_port).into(),
                    destination: (a.destination_address, a.destination_port).into(),
                }),
                ppp::v1::Addresses::Unknown => Parsed::Local,
            };
            Progress::Done(parsed, len)
        }
        Err(e) => Progress::Failed(Rejected::V1(e.to_string())),
    }
}

fn parse_v2(buf: &[u8]) -> Progress {
    // Version 2 and command LOCAL or PROXY, checked as soon as the byte is there so a broken
    // header is not waited on; ppp checks it again with the rest.
    if buf.get(12).is_some_and(|&vc| vc >> 4 != 2 || vc & 0x0f > 1) {
        return Progress::Failed(Rejected::V2(format!(
            "version/command byte {:#04x}",
            buf[12]
        )));
    }
    if buf.len() < V2_FIXED {
        return Progress::NeedMore;
    }
    let payload = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if payload > MAX_V2_PAYLOAD {
        return Progress::Failed(Rejected::V2TooLong(payload));
    }
    if buf.len() < V2_FIXED + payload {
        return Progress::NeedMore;
    }
    let len = V2_FIXED + payload;
    let header = match v2::Header::try_from(&buf[..len]) {
        Ok(header) => header,
        Err(e) => return Progress::Failed(Rejected::V2(e.to_string())),
    };
    if let Some(Err(e)) = header.tlvs().find(Result::is_err) {
        return Progress::Failed(Rejected::V2(e.to_string()));
    }
    let parsed = match (header.command, header.addresses) {
        (v2::Command::Local, _) => Parsed::Local,
        (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Parsed::Proxied(Origin {
            source: (a.source_address, a.source_port).into(),
            destination: (a.destination_address, a.destination_port).into(),
        }),
        (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Parsed::Proxied(Origin {
            source: (a.source_address, a.source_port).into(),
            destination: (a.destination_address, a.destination_port).into(),
        }),
        // UNSPEC or AF_UNIX: the specification says to use the connection's own addresses.
        (v2::Command::Proxy, _) => Parsed::Local,
    };
    Progress::Done(parsed, len)
}

/// Reads the header from a trusted front proxy within `limit`. Returns it with the bytes that
/// followed it in the same reads (the client's first bytes, to be forwarded first).
pub async fn read_header<R: AsyncRead + Unpin>(
    stream: &mut R,
    limit: Duration,
) -> Result<(Parsed, Vec<u8>), Rejected> {
    let mut buf = Vec::with_capacity(256);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut chunk = [0u8; 1024];
        let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await;
        match read {
            Err(_) => return Err(Rejected::Timeout(limit)),
            Ok(Err(e)) => return Err(Rejected::Read(e.to_string())),
            Ok(Ok(0)) => return Err(Rejected::Truncated(buf.len())),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        match parse(&buf) {
            Progress::NeedMore => continue,
            Progress::Done(parsed, len) => return Ok((parsed, buf.split_off(len))),
            Progress::Failed(rejected) => return Err(rejected),
        }
    }
}
