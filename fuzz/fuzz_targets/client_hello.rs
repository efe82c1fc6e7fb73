//! The ClientHello reassembly: any bytes, and the same handshake bytes re-framed into TLS
//! records of a size the input chooses, must give a verdict, never a panic; re-framing a
//! complete ClientHello must not change what is read from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spliced::peek::{inspect, tls, Progress};

fuzz_target!(|data: &[u8]| {
    let _ = inspect(data);
    let Some((&size, message)) = data.split_first() else {
        return;
    };
    // The rest as one handshake message in records of 1 + size bytes.
    let size = usize::from(size) + 1;
    let mut framed = Vec::with_capacity(message.len() + message.len() / size * 5 + 5);
    for chunk in message.chunks(size) {
        framed.extend_from_slice(&[22, 3, 1]);
        framed.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        framed.extend_from_slice(chunk);
    }
    let reframed = tls::inspect(&framed);
    if message.chunks(size).count() <= tls::MAX_RECORDS {
        let mut single = vec![22, 3, 1];
        if let Ok(len) = u16::try_from(message.len()) {
            if len > 0 && usize::from(len) <= 16 * 1024 {
                single.extend_from_slice(&len.to_be_bytes());
                single.extend_from_slice(message);
                if let (Progress::Done(a), Progress::Done(b)) = (tls::inspect(&single), &reframed) {
                    assert_eq!(&a, b, "re-framing changed the ClientHello's reading");
                }
            }
        }
    }
});
