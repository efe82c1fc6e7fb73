//! The three data paths. Each carries half-close both ways, ends the other side with an RST
//! when one side resets, and loses, duplicates or reorders nothing.
use std::{fmt, io};

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
