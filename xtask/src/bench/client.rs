//! The small-message clients, blocking std sockets on threads of this process: request/response
//! round trips, short connections, idle connections and set-up probes. Every loop is bounded by
//! a count and a deadline, and every socket operation by a timeout.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    server::{CLIENT_CLOSES, GREETING, QUIT, SHORT, SHORT_LEN},
    topology::{check_stop, STOP},
};

/// How long one connect, or one read, may take before the connection counts as failed.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a client connects, and what it sends first on every connection: nothing, or a TLS
/// ClientHello for a route that routes by server name (the upstream skips it).
#[derive(Clone, Copy)]
pub struct Target {
    pub addr: SocketAddr,
    pub hello: &'static [u8],
}

impl Target {
    pub fn plain(addr: SocketAddr) -> Target {
        Target { addr, hello: &[] }
    }
}

/// Connects, sends the target's ClientHello if it has one, and reads the greeting; returns the
/// stream and the time from `connect()` to the greeting (the ClientHello's write inside: a
/// route that peeks dials the upstream only once it has it).
pub fn greet(t: Target) -> Result<(TcpStream, Duration)> {
    let addr = t.addr;
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connect to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    if !t.hello.is_empty() {
        s.write_all(t.hello)
            .with_context(|| format!("writing the ClientHello to {addr}"))?;
    }
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .with_context(|| format!("no greeting through {addr} within {IO_TIMEOUT:?}"))?;
    let took = start.elapsed();
    if b[0] != GREETING {
        bail!("through {addr}: expected the greeting, got byte {}", b[0]);
    }
    Ok((s, took))
}

/// Asks the upstream to close first, waits for its EOF, then closes.
pub fn quit(mut s: TcpStream) -> Result<()> {
    s.write_all(&[QUIT])?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut b = [0u8; 64];
    for _ in 0..16 {
        if s.read(&mut b)? == 0 {
            return Ok(());
        }
    }
    bail!("the upstream sent bytes after QUIT")
}

/// [`quit`] on every connection, on a few threads; returns how many failed.
pub fn quit_all(conns: Vec<TcpStream>) -> usize {
    let failed = AtomicUsize::new(0);
    let chunk = conns.len().div_ceil(8).max(1);
    let mut conns = conns;
    thread::scope(|scope| {
        while !conns.is_empty() {
            let part: Vec<TcpStream> = conns.drain(..chunk.min(conns.len())).collect();
            let failed = &failed;
            scope.spawn(move || {
                for s in part {
                    if quit(s).is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    failed.into_inner()
}

/// Request/response on one connection.
pub struct RoundTrips {
    pub count: usize,
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Round trips gathered over connections taken one at a time (another contender's may come in
/// between): one connection's rate on this machine varies 2-3x with the cores its client and
/// forwarder land on, and fresh connections land anew.
#[derive(Default)]
pub struct RoundTripLog {
    lat: Vec<Duration>,
    secs: f64,
}

impl RoundTripLog {
    /// `size`-byte requests, each answered (echoed) before the next, on one new connection to
    /// `t`, for `dur` or until the log holds `max` round trips (then nothing is done).
    pub fn connection(&mut self, t: Target, size: usize, dur: Duration, max: usize) -> Result<()> {
        if self.lat.len() < max {
            self.secs += round_trips_on_one(t, size, dur, max, &mut self.lat)?;
        }
        Ok(())
    }

    /// The rate over every connection's time, and the percentiles of the round trips.
    pub fn summary(mut self) -> RoundTrips {
        let count = self.lat.len();
        self.lat.sort_unstable();
        RoundTrips {
            count,
            per_sec: count as f64 / self.secs.max(f64::MIN_POSITIVE),
            p50_us: percentile(&self.lat, 50.0),
            p99_us: percentile(&self.lat, 99.0),
        }
    }
}

/// How many connections a contender's round trips take in a round, each its share of the time:
/// one connection's rate spreads about ±20 % around the median here (p10-p90), so a round's
/// figure is the steadier the more connections it averages; 8 of 0.25 s keep each past 1,000
/// round trips (and `auto`'s 32 turns on the copy path a small part of it).
pub const RT_CONNECTIONS: usize = 8;

/// Round trips on one new connection for `dur`, or until `lat` holds `max` (at least one);
/// returns the seconds they took.
fn round_trips_on_one(
    t: Target,
    size: usize,
    dur: Duration,
    max: usize,
    lat: &mut Vec<Duration>,
) -> Result<f64> {
    let (mut s, _) = greet(t)?;
    let mut req = vec![b'R'; size];
    req[size - 1] = b'\n';
    let mut resp = vec![0u8; size];
    let (start, before) = (Instant::now(), lat.len());
    while lat.len() < max && start.elapsed() < dur {
        if lat.len().is_multiple_of(1024) {
            check_stop()?;
        }
        let t = Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut resp)
            .context("round trip: no echo within the timeout")?;
        lat.push(t.elapsed());
    }
    let elapsed = start.elapsed().as_secs_f64();
    if lat.len() == before {
        bail!("round trip: no request completed");
    }
    if resp != req {
        bail!("round trip: the echo differs from the request");
    }
    // Closed by dropping: the echo server echoes until the client's EOF (a few TIME_WAIT
    // sockets a round, not the port range).
    Ok(elapsed)
}

/// The `p`th percentile of sorted durations, in µs.
pub fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

/// Who closes a short connection first.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Closer {
    /// The upstream, after its echo; the client closes on its EOF. The forwarder's upstream
    /// socket is then the passive side and keeps no TIME_WAIT.
    Upstream,
    /// The client, right after the echo (the upstream waits for it): the forwarder's upstream
    /// socket closes first and stays in TIME_WAIT for 60 s, holding its port.
    Client,
}

/// One short connection: connect, the ClientHello if any and [`SHORT_LEN`] bytes in one write,
/// the greeting and the echo back, then the close `how` says.
fn short_one(addr: SocketAddr, first: &[u8], how: Closer) -> Result<()> {
    let msg = &first[first.len() - SHORT_LEN..];
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(first)?;
    let mut got = [0u8; SHORT_LEN + 2];
    let want = match how {
        Closer::Upstream => got.len(),
        Closer::Client => SHORT_LEN + 1,
    };
    let mut n = 0;
    // Bounded: each read returns at least one byte or ends the loop.
    while n < want {
        let k = s.read(&mut got[n..want])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    if n != SHORT_LEN + 1 || got[0] != GREETING || got[1..=SHORT_LEN] != *msg {
        bail!("short connection: got {n} bytes back, expected the greeting and {SHORT_LEN}");
    }
    Ok(())
}

/// What a short-connection run did.
pub struct Shorts {
    pub per_sec: f64,
    pub done: usize,
    pub failed: usize,
    pub first_error: Option<String>,
}

/// Short connections from `workers` threads, each one after the other, for `dur` or `max`
/// connections in all (a connection that fails costs its thread up to the I/O timeout). More
/// than 1% failures is an error; fewer are returned to be reported.
pub fn short_connections(
    t: Target,
    how: Closer,
    workers: usize,
    dur: Duration,
    max: usize,
) -> Result<Shorts> {
    let mut msg = t.hello.to_vec();
    msg.push(match how {
        Closer::Upstream => SHORT,
        Closer::Client => CLIENT_CLOSES,
    });
    msg.resize(t.hello.len() + SHORT_LEN, b's');
    let addr = t.addr;
    let done = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let first_error = Mutex::new(None::<String>);
    let start = Instant::now();
    thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while start.elapsed() < dur
                    && done.load(Ordering::Relaxed) < max
                    && !STOP.load(Ordering::Relaxed)
                {
                    match short_one(addr, &msg, how) {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let f = failed.fetch_add(1, Ordering::Relaxed) + 1;
                            first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert_with(|| format!("{e:#}"));
                            if f > max / 100 + 10 {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    check_stop()?;
    let elapsed = start.elapsed().as_secs_f64();
    let (done, failed) = (done.into_inner(), failed.into_inner());
    let first_error = first_error.into_inner().unwrap_or_else(|p| p.into_inner());
    if failed * 100 > done + failed || done == 0 {
        bail!(
            "short connections: {failed} of {} failed; first: {}",
            done + failed,
            first_error.unwrap_or_default()
        );
    }
    Ok(Shorts {
        per_sec: done as f64 / elapsed,
        done,
        failed,
        first_error,
    })
}

/// Opens idle connections (each greeted, so it reaches the upstream) on `threads` threads until
/// `conns` holds `target`. Stops at the first failure and says why: the contender's limit.
pub fn open_idle(
    t: Target,
    conns: &mut Vec<TcpStream>,
    target: usize,
    threads: usize,
) -> Result<()> {
    let missing = target.saturating_sub(conns.len());
    if missing == 0 {
        return Ok(());
    }
    let per = missing.div_ceil(threads);
    let opened = Mutex::new(Vec::with_capacity(missing));
    let first_error = Mutex::new(None::<anyhow::Error>);
    thread::scope(|scope| {
        for i in 0..threads {
            let n = per.min(missing.saturating_sub(i * per));
            let (opened, first_error) = (&opened, &first_error);
            scope.spawn(move || {
                let mut mine = Vec::with_capacity(n);
                for _ in 0..n {
                    if STOP.load(Ordering::Relaxed) {
                        break;
                    }
                    match greet(t) {
                        Ok((s, _)) => mine.push(s),
                        Err(e) => {
                            first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            break;
                        }
                    }
                }
                opened
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(mine);
            });
        }
    });
    conns.extend(opened.into_inner().unwrap_or_else(|p| p.into_inner()));
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if conns.len() < target {
        bail!("interrupted");
    }
    Ok(())
}

/// `count` connections one after the other, each timed from connect to the greeting, then
/// closed (upstream first); returns the median in µs.
pub fn setup_probes(t: Target, count: usize) -> Result<f64> {
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        check_stop()?;
        let (s, took) = greet(t)?;
        times.push(took);
        quit(s)?;
    }
    times.sort_unstable();
    Ok(percentile(&times, 50.0))
}
