//! The accepting side of the PROXY protocol: any bytes give a verdict, never a panic; a header
//! found is no longer than the input, reads the same without the bytes after it, and re-encoding
//! what it said yields a header that parses to the same addresses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spliced::proxy_header::{encode, parse, Parsed, Progress, Seen, Version};

fuzz_target!(|data: &[u8]| {
    if let Progress::Done(parsed, len) = parse(data) {
        assert!(len <= data.len());
        assert_eq!(parse(&data[..len]), Progress::Done(parsed.clone(), len));
        if let Parsed::Proxied(origin) = parsed {
            for version in [Version::V1, Version::V2] {
                let header = encode(version, origin, Seen::default());
                match parse(&header) {
                    Progress::Done(Parsed::Proxied(again), n) if n == header.len() => {
                        assert_eq!(again.source.port(), origin.source.port());
                        assert_eq!(again.destination.port(), origin.destination.port());
                    }
                    other => panic!("re-encoded {version} header reads as {other:?}"),
                }
            }
        }
    }
});
