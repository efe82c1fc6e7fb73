//! The TLS ClientHello, reassembled across TCP segments and TLS records.
//!
//! The record framing is walked here (a few lines; tls-parser reads each header) because the
//! handshake message may span records; the reassembled message and its extensions are parsed by
//! `tls-parser`, a maintained parser, not by hand.
use tls_parser::{
    parse_tls_client_hello_extensions, parse_tls_message_handshake, parse_tls_record_header,
    SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, TlsRecordType,
};

use super::{Malformed, Peeked, Progress, Protocol};

/// The largest ClientHello accepted, handshake header included (RFC 8446 allows up to 2^24 - 1;
/// real ones with post-quantum key shares are under 2 KiB, padded ones under 16 KiB).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;
/// A ClientHello may be split over this many records; more is a hostile peer, not a client.
pub const MAX_RECORDS: usize = 64;
/// The largest plaintext record body (RFC 8446 5.1).
const MAX_RECORD_BODY: usize = 16 * 1024;
const HANDSHAKE_HEADER: usize = 4;
const RECORD_HEADER: usize = 5;
/// TLS extension type of encrypted_client_hello (draft-ietf-tls-esni).
const ECH_EXTENSION: u16 = 0xfe0d;

/// Looks at the bytes a client sent so far (starting with a handshake record) and says whether
/// a whole ClientHello is there, more is needed, or it is not a valid one.
pub fn inspect(buf: &[u8]) -> Progress {
    let mut message = Vec::new();
    let mut rest = buf;
    let mut records = 0;
    loop {
        if let Some(done) = message_complete(&message) {
            return done;
        }
        if rest.len() < RECORD_HEADER {
            return Progress::NeedMore;
        }
        let header = match parse_tls_record_header(rest) {
            Ok((_, header)) => header,
            Err(_) => return Progress::Failed(Malformed::TlsRecord),
        };
        if header.record_type != TlsRecordType::Handshake {
            return Progress::Failed(Malformed::TlsRecord);
        }
        let len = usize::from(header.len);
        if len == 0 || len > MAX_RECORD_BODY {
            return Progress::Failed(Malformed::TlsRecord);
        }
        records += 1;
        if records > MAX_RECORDS {
            return Progress::Failed(Malformed::TooManyRecords);
        }
        let body = &rest[RECORD_HEADER..];
        let take = len.min(body.len());
        message.extend_from_slice(&body[..take]);
        if take < len {
            // A record cut short: whatever we have may already settle the verdict (a too-long
            // claim), otherwise wait for the rest.
            return message_complete(&message).unwrap_or(Progress::NeedMore);
        }
        rest = &body[len..];
    }
}

/// `None` while the handshake message is incomplete, else the verdict on it.
fn message_complete(message: &[u8]) -> Option<Progress> {
    if message.len() < HANDSHAKE_HEADER {
        return None;
    }
    if message[0] != 1 {
        return Some(Progress::Failed(Malformed::NotClientHello));
    }
    let len = u32::from_be_bytes([0, message[1], message[2], message[3]]) as usize;
    if HANDSHAKE_HEADER + len > MAX_CLIENT_HELLO {
        return Some(Progress::Failed(Malformed::TooLarge {
            claimed: HANDSHAKE_HEADER + len,
            limit: MAX_CLIENT_HELLO,
        }));
    }
    if message.len() < HANDSHAKE_HEADER + len {
        return None;
    }
    Some(parse_client_hello(&message[..HANDSHAKE_HEADER + len]))
}

fn parse_client_hello(message: &[u8]) -> Progress {
    let hello = match parse_tls_message_handshake(message) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) => hello,
        _ => return Progress::Failed(Malformed::ClientHello),
    };
    let mut peeked = Peeked::new(Protocol::Tls);
    let Some(ext) = hello.ext else {
        return Progress::Done(peeked);
    };
    let extensions = match parse_tls_client_hello_extensions(ext) {
        Ok(([], extensions)) => extensions,
        _ => return Progress::Failed(Malformed::ClientHello),
    };
    for extension in extensions {
        match extension {
            TlsExtension::SNI(names) => {
                let host = names.iter().find(|(kind, _)| *kind == SNIType::HostName);
                if let Some((_, name)) = host {
                    peeked.name = Some(super::name::from_wire(name));
                }
            }
            TlsExtension::ALPN(protocols) => {
                peeked.alpn = protocols
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
            }
            TlsExtension::Unknown(kind, _) if kind.0 == ECH_EXTENSION => peeked.ech = true,
            _ => {}
        }
    }
    Progress::Done(peeked)
}

/// A fatal `unrecognized_name` alert (RFC 6066 section 3), sent before closing a TLS client no
/// route matched, so it reports a name problem rather than a broken connection. Record: alert
/// (21), legacy version 3.3, length 2; alert: fatal (2), unrecognized_name (112).
pub const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 112];
