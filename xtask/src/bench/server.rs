//! The upstream of the small-message figures: run inside the namespace as the hidden
//! `xtask bench --serve PORT` (under `ip netns exec`), listening on [::]:PORT.
//!
//! Protocol, chosen so that the upstream side always closes first (its TIME_WAIT entries then
//! pile up in the namespace, not on the dialing side, where thousands of short connections to
//! one port would exhaust the ephemeral ports):
//!
//! - on accept the server sends one byte, [`GREETING`] (so connect-to-first-byte can be timed
//!   and every idle connection is known to reach the upstream);
//! - the client's first byte chooses: [`QUIT`] closes at once; [`SHORT`] starts a
//!   [`SHORT_LEN`]-byte message that is echoed, then the server closes; anything else starts an
//!   echo of everything until the client's EOF.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
};

pub const GREETING: u8 = b'G';
pub const QUIT: u8 = b'Q';
pub const SHORT: u8 = b'S';
pub const SHORT_LEN: usize = 100;

/// Serves until stdin closes (the bench drops its end, or dies).
pub fn serve(port: u16) -> Result<()> {
    super::sys::raise_nofile(1 << 20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        let socket = TcpSocket::new_v6()?;
        socket.set_reuseaddr(true)?;
        socket
            .bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
            .with_context(|| format!("cannot bind [::]:{port}"))?;
        let listener = socket.listen(4096)?;
        println!("ready");
        std::io::stdout().flush()?;
        let mut stdin_closed = tokio::task::spawn_blocking(|| {
            let mut b = [0u8; 64];
            while let Ok(1..) = std::io::stdin().read(&mut b) {}
        });
        loop {
            tokio::select! {
                _ = &mut stdin_closed => return Ok::<(), anyhow::Error>(()),
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(handle(stream));
                    }
                    Err(e) => {
                        // EMFILE and the like: say so, back off, go on.
                        eprintln!("bench server: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
    })?;
    std::process::exit(0)
}

async fn handle(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    if s.write_all(&[GREETING]).await.is_err() {
        return;
    }
    let mut first = [0u8; SHORT_LEN];
    let n = match s.read(&mut first).await {
        Ok(0) | Err(_) => return,
        Ok(n) => n,
    };
    match first[0] {
        QUIT => {}
        SHORT => {
            let mut got = n;
            while got < SHORT_LEN {
                match s.read(&mut first[got..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => got += k,
                }
            }
            let _ = s.write_all(&first).await;
        }
        _ => {
            if s.write_all(&first[..n]).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => {
                        if s.write_all(&buf[..k]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
    let _ = s.shutdown().await;
}
