//! The HTTP/1.x head: any bytes give a verdict, never a panic, and a decided head stays decided
//! the same way when more bytes follow it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spliced::peek::{http, Progress};

fuzz_target!(|data: &[u8]| {
    let first = http::inspect(data);
    let _ = http::looks_like_http(data);
    let _ = spliced::peek::inspect(data);
    if let Progress::Done(seen) = &first {
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"trailing body bytes");
        assert_eq!(http::inspect(&longer), Progress::Done(seen.clone()));
    }
});
