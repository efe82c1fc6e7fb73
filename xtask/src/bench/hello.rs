//! The TLS ClientHello the clients of the SNI-routed contender send first: one record, built
//! here like a TLS 1.3 client's (server_name, supported_versions, supported_groups,
//! signature_algorithms, an X25519 key_share, ALPN h2 and http/1.1) and padded (RFC 7685) to the
//! 512-byte handshake many clients send. Only its bytes matter: no handshake follows (the bench's
//! upstream skips one leading TLS record, see `server`).
use std::sync::OnceLock;

/// The name the SNI route matches.
pub const SNI: &str = "bench.example";

/// The record, built once.
pub fn client_hello() -> &'static [u8] {
    static HELLO: OnceLock<Vec<u8>> = OnceLock::new();
    HELLO.get_or_init(build)
}

/// `body` with a big-endian length prefix of `width` bytes.
fn prefixed(width: usize, body: &[u8]) -> Vec<u8> {
    let len = (body.len() as u32).to_be_bytes();
    let mut v = len[4 - width..].to_vec();
    v.extend_from_slice(body);
    v
}

fn extension(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut v = kind.to_be_bytes().to_vec();
    v.extend(prefixed(2, body));
    v
}

fn build() -> Vec<u8> {
    let mut ext = Vec::new();
    // server_name: a list of one host_name (type 0).
    let mut name = vec![0u8];
    name.extend(prefixed(2, SNI.as_bytes()));
    ext.extend(extension(0x0000, &prefixed(2, &name)));
    // supported_versions: TLS 1.3, 1.2.
    ext.extend(extension(0x002b, &prefixed(1, &[3, 4, 3, 3])));
    // supported_groups: x25519, secp256r1, secp384r1.
    ext.extend(extension(
        0x000a,
        &prefixed(2, &[0, 0x1d, 0, 0x17, 0, 0x18]),
    ));
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256, ed25519.
    ext.extend(extension(0x000d, &prefixed(2, &[4, 3, 8, 4, 4, 1, 8, 7])));
    // key_share: one X25519 share (32 bytes).
    let mut share = vec![0, 0x1d];
    share.extend(prefixed(2, &[0x42; 32]));
    ext.extend(extension(0x0033, &prefixed(2, &share)));
    // ALPN: h2, http/1.1.
    let mut alpn = prefixed(1, b"h2");
    alpn.extend(prefixed(1, b"http/1.1"));
    ext.extend(extension(0x0010, &prefixed(2, &alpn)));

    // legacy_version TLS 1.2, random, legacy_session_id, cipher suites (the three of TLS 1.3
    // and ECDHE-RSA-AES128-GCM-SHA256), compression methods (null only).
    let mut hello = vec![3, 3];
    hello.extend_from_slice(&[0x5a; 32]);
    hello.extend(prefixed(1, &[0x17; 32]));
    hello.extend(prefixed(2, &[0x13, 1, 0x13, 2, 0x13, 3, 0xc0, 0x2f]));
    hello.extend_from_slice(&[1, 0]);
    // Padding (21) so the handshake message comes to 512 bytes: 4 (header) + hello + 2
    // (extensions length) + ext + 4 (padding's header) + pad.
    let pad = 512usize.saturating_sub(4 + hello.len() + 2 + ext.len() + 4);
    ext.extend(extension(0x0015, &vec![0; pad]));
    hello.extend(prefixed(2, &ext));

    let mut handshake = vec![1]; // client_hello
    handshake.extend(prefixed(3, &hello));
    let mut record = vec![22, 3, 1]; // handshake record, legacy version TLS 1.0
    record.extend(prefixed(2, &handshake));
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_record_of_a_512_byte_handshake() {
        let r = client_hello();
        assert_eq!(&r[..3], &[22, 3, 1]);
        assert_eq!(usize::from(u16::from_be_bytes([r[3], r[4]])), r.len() - 5);
        assert_eq!(r.len() - 5, 512);
        assert_eq!(r[5], 1);
        let sni = SNI.as_bytes();
        assert!(r.windows(sni.len()).any(|w| w == sni));
    }
}
