//! Backpressure: a peer that stops reading stalls the sender, and what piles up in between stays
//! bounded (trap 8, README "Backpressure").
//!
//! On the sockmap path, with splice as the reference for the first two:
//! 1. upload stall: the upstream does not read for 8 s while the client pushes;
//! 2. download stall: the client does not read for 8 s while the upstream pushes;
//! 3. 50 connections stalled at once under `max_buffered_total = 32MiB`;
//! 4. a slow reader (10 MB/s) against a client pushing as fast as it can, for 10 s;
//! 5. the client's SHUT_WR while the upstream does not read for 3 s: after 16 MiB (the FIN
//!    reaches the daemon), after 48 MiB (most of the stream and the FIN wait in the client), and
//!    just when the daemon starts holding bytes (the FIN reaches it while it holds).
//!
//! Each test prints its figures (`--nocapture`) and checks:
//! - the bytes the kernel took from the sender against the socket buffers they can sit in plus
//!   the allowance ([`Buffers::bound`]);
//! - the bytes between the daemon's two sockets that no socket is charged for
//!   ([`Snapshot::uncharged`]): the psock backlog, which only `max_buffered` and
//!   `max_buffered_total` bound. This is the sharp check of trap 8;
//! - the memory this test took: MemAvailable's drop, less what other processes visibly took
//!   (the memory section);
//! - then that every byte arrives once and in order (SHA-256), the FINs follow, and the daemon
//!   logs the connection complete on the data path under test with the right byte counts.
//!
//! The tests measure memory, so they run one at a time (`SERIAL`), whatever the harness's
//! parallelism. Every socket has timeouts, every loop a bound in time and count, and every
//! namespace is removed on drop.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use tests::{
    closed_lines, closed_within, fields, inq, mem_available, meminfo_kib, outq, per_mode, rcvbuf,
    receive, set_rcvbuf, set_sndbuf, set_sndbuf_force, sndbuf, Forward, Payload, Spliced,
    TempConfig, Topology,
};

/// These tests measure memory: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const MIB: u64 = 1 << 20;
/// The daemon's defaults, which tests 1, 2, 4 and 5 run with: the per-direction allowance
/// (`max_buffered`, `DEFAULT_MAX_BUFFERED` in proxy-user/src/config.rs; 4 MiB until it was
/// raised for throughput) and the sockmap sockets' `send_buffer`, which is exactly their
/// `sk_sndbuf` (SO_SNDBUFFORCE with half of it; the kernel doubles).
const MAX_BUFFERED: u64 = 16 * MIB;
const SEND_BUFFER: u64 = 16 * MIB;
/// The pipe of the splice path (F_SETPIPE_SZ 1 MiB): its stand-in for `max_buffered`.
const PIPE: u64 = MIB;
/// The allowance every direction gets even from an exhausted pool (README: "256 KiB guaranteed
/// per direction").
const MIN_GRANT: u64 = 256 << 10;
/// The noise MemAvailable may show on this shared machine, beyond the sockets' buffers and the
/// psock allowance (with half again for the skbs' overhead), while one connection is stalled:
/// the sockets and the psock backlog alone may hold 37 MiB of a sockmap upload stall, and a
/// fixed 64 MiB for all of it failed in CI at 75.3 MiB with others quiet (sockets 21.3 MiB,
/// charged to none 53.9). A runaway (trap 8) is GBs; the byte counts hold the allowance.
const MEM_LIMIT: u64 = 64 * MIB;
/// How long the stalled peer does not read.
const STALL: Duration = Duration::from_secs(8);
/// Read/write timeout of every socket.
const IO: Duration = Duration::from_secs(30);
/// How long the daemon may take to log a connection's end.
const LOG: Duration = Duration::from_secs(15);
/// Upper bound on the rounds of any push or read loop (each round writes, reads or waits).
const MAX_ROUNDS: u64 = 50_000_000;

// ---- memory ----------------------------------------------------------------------------------
//
// MemAvailable is global: on a shared machine a neighbour compiling or running its own transfers
// moves it by hundreds of MiB within seconds. So each sample is split up: userspace memory
// (AnonPages) and TCP socket memory (the global `TCP: mem` of /proc/net/sockstat) that grew in
// processes and sockets other than this test's own are taken out; what remains is the drop this
// test and its daemon caused, plus kernel noise. Bytes held in psock backlogs are charged to no
// socket (trap 8), so they stay in it: this is the figure the bounds apply to. The raw drop is
// printed alongside.
//
// Others' psock backlogs and other kernel memory cannot be told apart from this test's, and a
// neighbour running its own sockmap transfers moves MemAvailable by up to a GiB (seen here). So
// a sample is marked disturbed when other processes were visibly busy: TCP sockets other than
// this test's came or went (the global `alloc` count of sockstat), or their TCP memory or
// userspace memory moved. A memory bound exceeded during a disturbed measurement repeats the
// test (at most three attempts, see [`attempts`]); exceeded in a quiet one, it fails.

/// The processes and sockets of one test: the daemon and this process; the host's sockets to
/// and from the daemon's listener and to the upstream port, and the namespace's upstream port.
#[derive(Clone)]
struct Ours {
    pid: i32,
    host_filter: String,
    netns: String,
    ns_filter: String,
}

impl Ours {
    fn of(fwd: &Forward) -> Ours {
        let lp = fwd.spliced.addr().port();
        let up = fwd.listener.local_addr().unwrap().port();
        Ours {
            pid: fwd.spliced.pid(),
            host_filter: format!("( sport = :{lp} or dport = :{lp} or dport = :{up} )"),
            netns: fwd.topo.netns.clone(),
            ns_filter: format!("( sport = :{up} )"),
        }
    }
}

/// One look at the machine's memory, in bytes.
#[derive(Clone, Copy, Debug, Default)]
struct MemSample {
    avail: u64,
    /// AnonPages: all processes' userspace memory.
    anon: u64,
    /// RssAnon of the daemon and this process.
    our_anon: u64,
    /// All TCP sockets' memory (`TCP: mem`, global across namespaces).
    tcp: u64,
    /// This test's sockets' share of it: receive queue, send queue, forward allocation.
    our_tcp: i64,
    /// This test's TCP sockets.
    our_sockets: i64,
    /// TCP sockets of others (all namespaces): sockstat's global `alloc` less this test's.
    foreign_sockets: i64,
}

fn rss_anon(pid: &str) -> u64 {
    // A process that has just exited has no status any more: it holds nothing.
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|t| meminfo_kib(&t, "RssAnon:") * 1024)
        .unwrap_or(0)
}

fn sample(ours: &Ours) -> MemSample {
    let avail = mem_available();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap();
    let pages: u64 = sockstat
        .lines()
        .find_map(|l| l.strip_prefix("TCP: "))
        .and_then(|l| l.split("mem ").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .expect("TCP mem in /proc/net/sockstat");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let alloc: i64 = sockstat
        .lines()
        .find_map(|l| l.strip_prefix("TCP: "))
        .and_then(|l| l.split("alloc ").nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("TCP alloc in /proc/net/sockstat");
    let socks: Vec<SsSocket> = ss(&ours.host_filter)
        .into_iter()
        .chain(ss_in(&ours.netns, &ours.ns_filter))
        // Time-wait sockets are not full sockets: `alloc` does not count them.
        .filter(|s| s.state != "TIME-WAIT")
        .collect();
    let our_tcp = socks.iter().map(|s| s.r + s.w + s.f).sum();
    MemSample {
        our_sockets: socks.len() as i64,
        foreign_sockets: alloc - socks.len() as i64,
        avail,
        anon: meminfo_kib(&meminfo, "AnonPages:") * 1024,
        our_anon: rss_anon(&ours.pid.to_string()) + rss_anon("self"),
        tcp: pages * page,
        our_tcp,
    }
}

/// A sample compared with the baseline.
#[derive(Clone, Copy, Debug, Default)]
struct MemDrop {
    /// MemAvailable's drop.
    raw: i64,
    /// Userspace memory that others took.
    others_anon: i64,
    /// TCP socket memory that others' sockets took.
    others_tcp: i64,
    /// This test's sockets' memory.
    our_tcp: i64,
    /// The daemon's and this process's userspace memory.
    our_anon: i64,
    /// Other processes were busy: why.
    disturbed: Option<&'static str>,
}

impl MemDrop {
    fn new(base: &MemSample, now: &MemSample) -> MemDrop {
        let d = |a: u64, b: u64| a as i64 - b as i64;
        let our_tcp = now.our_tcp - base.our_tcp;
        let our_anon = d(now.our_anon, base.our_anon);
        let others_anon = d(now.anon, base.anon) - our_anon;
        let others_tcp = d(now.tcp, base.tcp) - our_tcp;
        MemDrop {
            raw: d(base.avail, now.avail),
            others_anon,
            others_tcp,
            our_tcp,
            our_anon,
            disturbed: None,
        }
    }

    /// MemAvailable's drop less what others took: this test's.
    fn ours(&self) -> i64 {
        self.raw - self.others_anon.max(0) - self.others_tcp.max(0)
    }

    /// This test's drop less its sockets' and processes' own memory: kernel memory charged to
    /// no socket (psock backlogs), plus noise.
    fn uncharged(&self) -> i64 {
        self.ours() - self.our_tcp - self.our_anon
    }
}

impl std::fmt::Display for MemDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = |b: i64| b as f64 / MIB as f64;
        write!(
            f,
            "{:.1} MiB (MemAvailable drop {:.1} MiB, less {:.1} MiB userspace and {:.1} MiB TCP \
             memory of other processes; of it this test's sockets {:.1} MiB, its processes \
             {:.1} MiB, charged to no socket {:.1} MiB)",
            m(self.ours()),
            m(self.raw),
            m(self.others_anon.max(0)),
            m(self.others_tcp.max(0)),
            m(self.our_tcp),
            m(self.our_anon),
            m(self.uncharged())
        )
    }
}

/// What a [`MemWatch`] saw.
#[derive(Clone, Copy, Debug)]
struct MemResult {
    /// The sample with the largest drop of this test's own.
    worst: MemDrop,
    /// The largest raw MemAvailable drop.
    raw_max: i64,
    /// Why some sample was disturbed by other processes, if one was.
    disturbed: Option<&'static str>,
}

/// Memory sampled every 50 ms on a thread against a baseline taken at start.
struct MemWatch {
    result: Arc<Mutex<Option<MemResult>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl MemWatch {
    /// Takes the baseline (before the test's connections exist) and starts sampling.
    fn start(ours: &Ours) -> MemWatch {
        // The median of three, so that one noisy look does not move the baseline.
        let mut samples: Vec<MemSample> = (0..3)
            .map(|_| {
                thread::sleep(Duration::from_millis(30));
                sample(ours)
            })
            .collect();
        samples.sort_by_key(|s| s.avail);
        let base = samples[1];
        let result = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (result, stop, ours) = (result.clone(), stop.clone(), ours.clone());
            thread::spawn(move || {
                let mut prev = base;
                // At most 10 minutes of samples, whatever happens to the test.
                for _ in 0..12_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let now = sample(&ours);
                    let mut d = MemDrop::new(&base, &now);
                    // The global figures and this test's own are read one after the other:
                    // while its own connections come and go or fill up, the differences are
                    // off. They are taken only when this test's sockets stood still since the
                    // previous sample.
                    let still = now.our_sockets == prev.our_sockets
                        && (now.our_tcp - prev.our_tcp).abs() < 2 * MIB as i64;
                    let p = MemDrop::new(&base, &prev);
                    d.disturbed = if !still {
                        None
                    } else if now.foreign_sockets != base.foreign_sockets
                        && now.foreign_sockets == prev.foreign_sockets
                    {
                        Some("other TCP sockets came or went")
                    } else if d.others_tcp.abs() > 8 * MIB as i64
                        && p.others_tcp.abs() > 8 * MIB as i64
                    {
                        Some("other TCP sockets' memory moved by more than 8 MiB")
                    } else if d.others_anon.abs() > 64 * MIB as i64 {
                        Some("other processes' userspace memory moved by more than 64 MiB")
                    } else {
                        None
                    };
                    prev = now;
                    let mut r = result.lock().unwrap();
                    let r = r.get_or_insert(MemResult {
                        worst: d,
                        raw_max: d.raw,
                        disturbed: None,
                    });
                    if d.ours() > r.worst.ours() {
                        r.worst = d;
                    }
                    r.raw_max = r.raw_max.max(d.raw);
                    r.disturbed = r.disturbed.or(d.disturbed);
                    thread::sleep(Duration::from_millis(50));
                }
            })
        };
        MemWatch {
            result,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; returns what it saw.
    fn finish(mut self) -> MemResult {
        self.halt();
        self.result
            .lock()
            .unwrap()
            .expect("at least one memory sample")
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MemWatch {
    fn drop(&mut self) {
        self.halt();
    }
}

// ---- sockets ---------------------------------------------------------------------------------

/// The third value of a `min default max` sysctl of net/ipv4.
fn sysctl_max(name: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).unwrap();
    text.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// A TCP socket as `ss -tmn` shows it.
#[derive(Debug, Default, Clone)]
struct SsSocket {
    state: String,
    /// Received, not yet consumed (for a sockmap socket: not yet taken by the verdict).
    recv_q: u64,
    /// Sent, not yet acknowledged by the peer.
    send_q: u64,
    /// `sk_rmem_alloc`: receive queue and, on sockmap, held bytes (psock ingress).
    r: i64,
    /// `sk_rcvbuf`.
    rb: u64,
    /// `sk_wmem_queued`.
    w: i64,
    /// `sk_sndbuf`.
    tb: u64,
    /// `sk_forward_alloc` (negative at times on sockmap sockets).
    f: i64,
}

/// The host's TCP sockets (any state) matching an `ss` filter expression.
fn ss(filter: &str) -> Vec<SsSocket> {
    ss_args(&[], filter)
}

/// The TCP sockets of namespace `netns` matching an `ss` filter expression.
fn ss_in(netns: &str, filter: &str) -> Vec<SsSocket> {
    ss_args(&["-N", netns], filter)
}

fn ss_args(pre: &[&str], filter: &str) -> Vec<SsSocket> {
    let mut args = pre.to_vec();
    args.push("-Htmna");
    args.extend(filter.split(' '));
    let out = std::process::Command::new("ss")
        .args(&args)
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss {args:?}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found: Vec<SsSocket> = Vec::new();
    for line in text.lines() {
        if let Some(skmem) = line.split("skmem:(").nth(1) {
            let last = found.last_mut().expect("skmem after a socket line");
            let skmem = skmem.split(')').next().unwrap();
            for field in skmem.split(',') {
                let split = field
                    .find(|c: char| c.is_ascii_digit())
                    .unwrap_or(field.len());
                let (name, value) = field.split_at(split);
                let Ok(value) = value.parse::<u64>() else {
                    continue;
                };
                // The kernel's values are ints, printed as unsigned 32-bit numbers.
                let signed = i64::from(value as u32 as i32);
                match name {
                    "r" => last.r = signed,
                    "rb" => last.rb = value,
                    "w" => last.w = signed,
                    "tb" => last.tb = value,
                    "f" => last.f = signed,
                    _ => {}
                }
            }
        } else if !line.starts_with(char::is_whitespace) && !line.trim().is_empty() {
            let f: Vec<&str> = line.split_whitespace().collect();
            found.push(SsSocket {
                state: f[0].to_string(),
                recv_q: f[1].parse().unwrap(),
                send_q: f[2].parse().unwrap(),
                ..SsSocket::default()
            });
        }
    }
    found
}

/// The daemon's socket whose local port is `local` and peer port `peer`.
fn daemon_socket(local: u16, peer: u16) -> SsSocket {
    let found = ss(&format!("( sport = :{local} and dport = :{peer} )"));
    assert_eq!(found.len(), 1, "ss sport {local} dport {peer}: {found:?}");
    found[0].clone()
}

/// One connection through the daemon: the client's socket, the upstream's, and the ports that
/// name the daemon's two sockets of it in `ss`.
struct Conn {
    client: TcpStream,
    upstream: TcpStream,
}

impl Conn {
    fn open(fwd: &Forward) -> Conn {
        let (client, upstream) = fwd.pair(IO);
        Conn { client, upstream }
    }

    /// The daemon's socket facing the client.
    fn proxy_client(&self) -> SsSocket {
        let c = self.client.local_addr().unwrap();
        let l = self.client.peer_addr().unwrap();
        daemon_socket(l.port(), c.port())
    }

    /// The daemon's socket facing the upstream.
    fn proxy_upstream(&self) -> SsSocket {
        let p = self.upstream.peer_addr().unwrap();
        let u = self.upstream.local_addr().unwrap();
        daemon_socket(p.port(), u.port())
    }
}

/// The buffers a stalled direction's bytes can sit in, from the sender to the receiver, measured
/// at the end of the stall (they only grow while it lasts: autotuning).
#[derive(Debug, Clone, Copy, Default)]
struct Buffers {
    /// The sender's `sk_sndbuf`.
    sender_snd: u64,
    /// The daemon's receiving socket's `sk_rcvbuf`.
    proxy_rcv: u64,
    /// The daemon's sending socket's `sk_sndbuf`.
    proxy_snd: u64,
    /// The receiver's `sk_rcvbuf`.
    receiver_rcv: u64,
}

impl Buffers {
    /// The most bytes the sender can get out while the receiver reads nothing, given
    /// `allowance` bytes the daemon may have in flight beyond its sockets (sockmap:
    /// `max_buffered` redirected beyond the peer's send queue; splice: the pipe).
    ///
    /// Each buffer is in truesize units, which exceed the payload they hold, so each term is an
    /// upper bound of its payload. The daemon's receiving socket counts twice: held bytes fill
    /// its buffer and close its window, but one window it advertised before (at most its whole
    /// buffer) can still arrive, and is held too, charged beyond the buffer (see
    /// [`uncharged_within`]). One 64 KiB skb of slack per socket: a queue is checked against
    /// its limit before the skb that crosses it is added.
    fn bound(&self, allowance: u64) -> u64 {
        self.sockets() + allowance + 4 * 64 * 1024
    }

    /// The sockets' part of [`Buffers::bound`]: what they can be charged (truesize), the
    /// daemon's receiving socket twice.
    fn sockets(&self) -> u64 {
        self.sender_snd + 2 * self.proxy_rcv + self.proxy_snd + self.receiver_rcv
    }

    fn add(&mut self, o: Buffers) {
        self.sender_snd += o.sender_snd;
        self.proxy_rcv += o.proxy_rcv;
        self.proxy_snd += o.proxy_snd;
        self.receiver_rcv += o.receiver_rcv;
    }
}

/// The bound of [`Buffers::bound`] with every buffer at its largest the sysctls allow (send
/// buffers autotune up to tcp_wmem's max, receive buffers up to tcp_rmem's), for reference.
fn sysctl_bound(proxy_snd: u64, allowance: u64) -> u64 {
    Buffers {
        sender_snd: sysctl_max("tcp_wmem"),
        proxy_rcv: sysctl_max("tcp_rmem"),
        proxy_snd,
        receiver_rcv: sysctl_max("tcp_rmem"),
    }
    .bound(allowance)
}

// ---- pushing ---------------------------------------------------------------------------------

/// A sender of a deterministic stream over a non-blocking socket, counting what the kernel took.
struct Pusher {
    payload: Payload,
    sent: u64,
    hash: Sha256,
    /// When the kernel last took a byte, from the first push.
    last_progress: Duration,
    started: Option<Instant>,
}

impl Pusher {
    fn new(seed: u64) -> Pusher {
        Pusher {
            payload: Payload::new(u64::MAX, seed),
            sent: 0,
            hash: Sha256::new(),
            last_progress: Duration::ZERO,
            started: None,
        }
    }

    /// Writes until the socket would block; returns the bytes taken.
    fn push(&mut self, s: &mut TcpStream) -> u64 {
        let started = *self.started.get_or_insert_with(Instant::now);
        let mut taken = 0;
        // Bounded: a 4 GiB send buffer would still end it.
        for _ in 0..65_536 {
            let chunk = self.payload.chunk(self.sent);
            match s.write(chunk) {
                Ok(n) => {
                    self.hash.update(&chunk[..n]);
                    self.sent += n as u64;
                    taken += n as u64;
                    self.last_progress = started.elapsed();
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("push after {} bytes: {e}", self.sent),
            }
        }
        taken
    }

    /// Pushes as fast as the kernel takes it for `dur`, calling `each` about every 10 ms.
    fn push_for(&mut self, s: &mut TcpStream, dur: Duration, mut each: impl FnMut(u64)) {
        s.set_nonblocking(true).unwrap();
        let end = Instant::now() + dur;
        let mut next = Instant::now();
        for _ in 0..MAX_ROUNDS {
            let now = Instant::now();
            if now >= end {
                break;
            }
            if now >= next {
                each(self.sent);
                next = now + Duration::from_millis(10);
            }
            if self.push(s) == 0 {
                wait_writable(&[s.as_raw_fd()], Duration::from_millis(10));
            }
        }
        s.set_nonblocking(false).unwrap();
    }

    fn sha256(&self) -> [u8; 32] {
        self.hash.clone().finalize().into()
    }
}

/// Waits (at most `limit`) until one of `fds` is writable.
fn wait_writable(fds: &[i32], limit: Duration) {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        })
        .collect();
    // SAFETY: valid pollfds.
    unsafe {
        libc::poll(
            p.as_mut_ptr(),
            p.len() as libc::nfds_t,
            limit.as_millis() as i32,
        )
    };
}

/// Reads `s` to EOF on a thread; returns (bytes, SHA-256).
fn drain(mut s: TcpStream) -> thread::JoinHandle<(u64, [u8; 32])> {
    thread::spawn(move || receive(&mut s).expect("read to EOF"))
}

/// The allowance the daemon may have beyond its sockets on `mode` by default.
fn allowance(mode: &str) -> u64 {
    match mode {
        "sockmap" => MAX_BUFFERED,
        _ => PIPE,
    }
}

/// Where the bytes of one stalled direction are, and the buffers that bound them.
struct Snapshot {
    bufs: Buffers,
    /// Payload in the sender's send queue.
    sender_q: u64,
    /// The daemon's receiving socket.
    proxy_rcv: SsSocket,
    /// The daemon's sending socket.
    proxy_snd: SsSocket,
    /// Payload in the receiver's receive queue.
    receiver_q: u64,
}

impl Snapshot {
    fn take(conn: &Conn, dir: Dir) -> Snapshot {
        let (pc, pu) = (conn.proxy_client(), conn.proxy_upstream());
        let (sender, receiver, proxy_rcv, proxy_snd) = match dir {
            Dir::Upload => (&conn.client, &conn.upstream, pc, pu),
            Dir::Download => (&conn.upstream, &conn.client, pu, pc),
        };
        Snapshot {
            bufs: Buffers {
                sender_snd: sndbuf(sender),
                proxy_rcv: proxy_rcv.rb,
                proxy_snd: proxy_snd.tb,
                receiver_rcv: rcvbuf(receiver),
            },
            sender_q: outq(sender),
            receiver_q: inq(receiver),
            proxy_rcv,
            proxy_snd,
        }
    }

    /// Of `in_flight` bytes sent and not yet read, those between the daemon's two sockets that
    /// neither is charged for: on sockmap the psock backlog, which only `max_buffered` bounds
    /// (trap 8); on splice the pipe. An underestimate by the overhead of the receiving socket's
    /// queued and held skbs, whose truesize (rmem) is subtracted in place of their payload:
    /// if the true figure is within its bound, so is this.
    fn uncharged(&self, in_flight: u64) -> i64 {
        in_flight as i64
            - (self.sender_q + self.proxy_snd.send_q + self.receiver_q) as i64
            - self.proxy_rcv.r
    }

    /// `sent` split up along the way.
    fn describe(&self, sent: u64) -> String {
        let in_daemon =
            sent.saturating_sub(self.sender_q + self.proxy_snd.send_q + self.receiver_q);
        format!(
            "sender's send queue {}; between the daemon's sockets {} (its receiving socket: \
             Recv-Q {}, rmem {}; the rest in the psock backlog, or splice's pipe); daemon's send queue {}; \
             receiver's receive queue {}",
            mib(self.sender_q),
            mib(in_daemon),
            mib(self.proxy_rcv.recv_q),
            mib_i(self.proxy_rcv.r),
            mib(self.proxy_snd.send_q),
            mib(self.receiver_q)
        )
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

fn mib_i(b: i64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

/// Slack of [`uncharged_within`] per connection: a few skbs in flight on the wire or not yet
/// acknowledged when the queues are looked at one after the other.
const UNCHARGED_SLACK: u64 = 256 << 10;

/// Bounds checked once all figures of a phase are printed: a failure still shows them all.
#[derive(Default)]
struct Checks {
    failed: Vec<String>,
    /// Memory bounds exceeded while other processes were busy.
    disturbed: Vec<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, failure: impl FnOnce() -> String) {
        if !ok {
            self.failed.push(failure());
        }
    }

    /// Panics with every failed check; Err if only memory bounds were exceeded, and only while
    /// other processes were busy (the attempt is repeated, see [`attempts`]).
    fn done(self, what: &str) -> Result<(), String> {
        assert!(
            self.failed.is_empty(),
            "{what}:\n{}",
            self.failed.join("\n")
        );
        match self.disturbed.is_empty() {
            true => Ok(()),
            false => Err(self.disturbed.join("\n")),
        }
    }
}

/// Prints and checks that what sits between the daemon's sockets charged to neither
/// ([`Snapshot::uncharged`]) is within `allowance`: on sockmap what the verdict may redirect
/// beyond the peer's send queue, on splice the pipe.
///
/// Held bytes do not add to it: an skb the verdict passes to its own socket is charged to that
/// socket at once, whether or not its buffer is full (`sk_psock_skb_ingress_self`:
/// `skb_set_owner_r`, no `sk_rcvbuf` check); it waits uncharged in the psock's backlog only
/// behind an earlier skb whose enqueueing failed for want of memory, which a healthy machine
/// does not see. (The module doc of `forward/sockmap.rs` expects one more window there "over
/// `sk_rcvbuf`"; measured here it is charged, and shows in [`Buffers::bound`]'s second
/// receive buffer.)
fn uncharged_within(checks: &mut Checks, what: &str, uncharged: i64, allowance: u64) {
    let bound = allowance + UNCHARGED_SLACK;
    eprintln!(
        "{what}: between the daemon's sockets, charged to neither: {} (bound {} = allowance {} \
         + slack)",
        mib_i(uncharged),
        mib(bound),
        mib(allowance),
    );
    checks.check(uncharged < bound as i64, || {
        format!(
            "{what}: {} between the daemon's sockets charged to neither, bound {}",
            mib_i(uncharged),
            mib(bound)
        )
    });
}

/// Prints and checks that this test's memory stayed under `limit` (see the memory section).
fn mem_within(checks: &mut Checks, what: &str, mem: &MemResult, limit: u64) {
    let quiet = match mem.disturbed {
        Some(why) => format!("disturbed: {why}"),
        None => "others quiet".to_string(),
    };
    eprintln!(
        "{what}: memory: worst sample {}; largest raw MemAvailable drop {}; limit {} ({quiet})",
        mem.worst,
        mib_i(mem.raw_max),
        mib(limit)
    );
    if mem.worst.ours() >= limit as i64 {
        let failure = format!(
            "{what}: memory grew by {}, limit {} ({quiet})",
            mem.worst,
            mib(limit)
        );
        match mem.disturbed {
            Some(_) => checks.disturbed.push(failure),
            None => checks.failed.push(failure),
        }
    }
}

/// Runs a test (under [`SERIAL`]) up to three times while it fails only a memory bound, and
/// only while other processes were busy; each attempt sets up afresh.
fn attempts(what: &str, mut attempt: impl FnMut() -> Result<(), String>) {
    let _serial = serial();
    let mut why = Vec::new();
    for n in 1..=3 {
        match attempt() {
            Ok(()) => return,
            Err(e) => {
                eprintln!("{what}: attempt {n}: memory bound exceeded while others were busy: {e}");
                why.push(e);
                thread::sleep(Duration::from_secs(5));
            }
        }
    }
    panic!(
        "{what}: memory bound exceeded in all three attempts, each while others were busy:\n{}",
        why.join("\n")
    );
}

// ---- 1, 2: one connection stalled ------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    Upload,
    Download,
}

/// The peer of one direction does not read for [`STALL`] while the other end pushes as fast
/// as the kernel takes it; then it reads everything.
fn stall(mode: &str, dir: Dir) -> Result<(), String> {
    let started = Instant::now();
    let Some(mut setup) = Forward::start(mode, &[]) else {
        return Ok(());
    };
    let what = match dir {
        Dir::Upload => format!("{mode} upload stall"),
        Dir::Download => format!("{mode} download stall"),
    };
    let mem = MemWatch::start(&Ours::of(&setup));
    let mut conn = Conn::open(&setup);
    let mut pusher = Pusher::new(1);
    let sender = match dir {
        Dir::Upload => &mut conn.client,
        Dir::Download => &mut conn.upstream,
    };
    pusher.push_for(sender, STALL, |_| {});
    let mem = mem.finish();
    setup.spliced.assert_running();

    let snap = Snapshot::take(&conn, dir);
    let bound = snap.bufs.bound(allowance(mode));
    eprintln!(
        "{what}: the sender got {} ({} bytes) out in {STALL:?}, the last byte after {:.2} s; \
         bound {} ({bound} bytes) = {:?} + allowance {} (with sysctl maxima: {})",
        mib(pusher.sent),
        pusher.sent,
        pusher.last_progress.as_secs_f64(),
        mib(bound),
        snap.bufs,
        mib(allowance(mode)),
        mib(sysctl_bound(snap.bufs.proxy_snd, allowance(mode))),
    );
    eprintln!("{what}: where: {}", snap.describe(pusher.sent));
    let mut checks = Checks::default();
    checks.check(pusher.sent < bound, || {
        format!(
            "the sender got {} bytes out while its peer read nothing; bound {bound}",
            pusher.sent
        )
    });
    uncharged_within(
        &mut checks,
        &what,
        snap.uncharged(pusher.sent),
        allowance(mode),
    );
    let mem_bound = snap.bufs.sockets() + allowance(mode) * 3 / 2 + MEM_LIMIT;
    mem_within(&mut checks, &what, &mem, mem_bound);
    checks.done(&what)?;

    // The stalled peer reads everything; the sender's FIN follows the last byte.
    let sent_sha = pusher.sha256();
    let t = Instant::now();
    let (mut sender, receiver) = match dir {
        Dir::Upload => (conn.client, conn.upstream),
        Dir::Download => (conn.upstream, conn.client),
    };
    let reader = drain(receiver.try_clone().unwrap());
    sender.shutdown(Shutdown::Write).unwrap();
    let (got, sha) = reader.join().expect("reader");
    eprintln!(
        "{what}: the peer then read {got} bytes to EOF in {:.2} s; test took {:.1} s",
        t.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(got, pusher.sent, "{what}: bytes read after the stall");
    assert_eq!(sha, sent_sha, "{what}: SHA-256 after the stall");
    receiver.shutdown(Shutdown::Write).unwrap();
    closed_within(&mut sender, Duration::from_secs(10));
    let (up, down) = match dir {
        Dir::Upload => (got, 0),
        Dir::Download => (0, got),
    };
    setup.spliced.assert_closed(0, Some(mode), up, down);
    Ok(())
}

fn upload_stall(mode: &str) {
    attempts(&format!("{mode} upload stall"), || stall(mode, Dir::Upload));
}
per_mode!(upload_stall, super::upload_stall, [sockmap, splice]);

fn download_stall(mode: &str) {
    attempts(&format!("{mode} download stall"), || {
        stall(mode, Dir::Download)
    });
}
per_mode!(download_stall, super::download_stall, [sockmap, splice]);

// ---- 3: many connections stalled at once under a small global pool ---------------------------

/// Connections stalled at once.
const MANY: usize = 50;
/// The pool they share, and each direction's allowance.
const MANY_TOTAL: u64 = 32 * MIB;
const MANY_EACH: u64 = 4 * MIB;
/// The daemon's `send_buffer` for them: small, so that the pool, not the daemon's send queues,
/// decides whether the bound holds (with the default 16 MiB, 50 send queues alone could take
/// 800 MiB, which the pool does not cover and a broken pool would hide in).
const MANY_SEND_BUFFER: u64 = MIB;
/// The test's own sockets' buffers, fixed (no autotuning) for the same reason: the clients' send
/// buffers and the upstreams' receive buffers (SO_SNDBUF/SO_RCVBUF with half of it).
const MANY_ENDPOINT_BUFFER: u64 = 256 << 10;

/// 50 clients push while no upstream reads, under `max_buffered_total = 32MiB`.
///
/// What bounds the bytes they get out: each connection's socket buffers (as in [`Buffers`]), and
/// the psock backlogs, which only the pool bounds: all directions together reserve at most
/// `max_buffered_total`, except that every direction gets at least 256 KiB (README), so the
/// upload directions' allowances sum to at most `max_buffered_total + 2 * 50 * 256 KiB`
/// = 57 MiB. Without the pool it would be 50 * `max_buffered` = 200 MiB.
///
/// The sum of the buffers is loose (the daemon's client sockets autotune to about 1 MiB each,
/// counted twice): with the pool at 256 MiB, i.e. not binding, the clients got 253-264 MiB out
/// against bounds of 248-267 MiB, so it may or may not catch a pool that does nothing. What
/// tells them apart is the bytes between the daemon's sockets that no socket is charged for
/// ([`Snapshot::uncharged`]), held to the pool: about 20 MiB here, 123.5 MiB with the pool at
/// 256 MiB (both measured), bound 69.5 MiB. MemAvailable cannot tell them apart at this scale
/// (the noise is tens of MiB); its bound catches a runaway.
#[test]
fn many_stalled_sockmap() {
    attempts("50 stalled", many_stalled);
}

fn many_stalled() -> Result<(), String> {
    let started = Instant::now();
    let topo = Topology::new();
    let listener = topo.listen();
    set_rcvbuf(&listener, MANY_ENDPOINT_BUFFER / 2);
    let port = listener.local_addr().unwrap().port();
    let config = TempConfig::new(&format!(
        "max_buffered = \"{}MiB\"\nmax_buffered_total = \"{}MiB\"\nsend_buffer = \"{}MiB\"\n\
         \n[[route]]\nname = \"many\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\
         mode = \"sockmap\"\n",
        MANY_EACH / MIB,
        MANY_TOTAL / MIB,
        MANY_SEND_BUFFER / MIB,
        topo.upstream(port)
    ));
    let spliced = Spliced::start_mode("sockmap", &["--config", config.path()], 1);
    drop(config);
    let Some(spliced) = spliced else {
        return Ok(());
    };
    let mut fwd = Forward {
        spliced,
        listener,
        topo,
    };
    let mem = MemWatch::start(&Ours::of(&fwd));
    let mut conns: Vec<Conn> = (0..MANY)
        .map(|_| {
            let c = Conn::open(&fwd);
            set_sndbuf(&c.client, MANY_ENDPOINT_BUFFER / 2);
            c.client.set_nonblocking(true).unwrap();
            c
        })
        .collect();
    let mut pushers: Vec<Pusher> = (0..MANY).map(|i| Pusher::new(100 + i as u64)).collect();
    let fds: Vec<i32> = conns.iter().map(|c| c.client.as_raw_fd()).collect();
    let end = Instant::now() + STALL;
    for _ in 0..MAX_ROUNDS {
        if Instant::now() >= end {
            break;
        }
        let mut taken = 0;
        for (c, p) in conns.iter_mut().zip(&mut pushers) {
            taken += p.push(&mut c.client);
        }
        if taken == 0 {
            wait_writable(&fds, Duration::from_millis(10));
        }
    }
    let mem = mem.finish();
    fwd.spliced.assert_running();

    let sent: u64 = pushers.iter().map(|p| p.sent).sum();
    let mut bufs = Buffers::default();
    let mut snaps = Vec::new();
    for c in &conns {
        c.client.set_nonblocking(false).unwrap();
        let s = Snapshot::take(c, Dir::Upload);
        bufs.add(s.bufs);
        snaps.push(s);
    }
    let pool = MANY_TOTAL + 2 * MANY as u64 * MIN_GRANT;
    // Buffers::bound's slack is per connection.
    let bound = bufs.bound(pool) + (MANY as u64 - 1) * 4 * 64 * 1024;
    let most = pushers.iter().map(|p| p.sent).max().unwrap();
    let least = pushers.iter().map(|p| p.sent).min().unwrap();
    eprintln!(
        "{MANY} stalled: the clients got {} ({sent} bytes) out in {STALL:?} (per connection \
         {} to {}); bound {} = sums of {bufs:?} (the daemon's receive buffers twice) + pool {}",
        mib(sent),
        mib(least),
        mib(most),
        mib(bound),
        mib(pool),
    );
    let queued: u64 = snaps
        .iter()
        .map(|s| s.sender_q + s.proxy_snd.send_q + s.receiver_q)
        .sum();
    let held: i64 = snaps.iter().map(|s| s.proxy_rcv.r).sum();
    eprintln!(
        "{MANY} stalled: {} in the clients' and the daemon's send queues and the upstreams' \
         receive queues; the daemon's client sockets charged {} (held)",
        mib(queued),
        mib_i(held),
    );
    let mut checks = Checks::default();
    checks.check(sent < bound, || {
        format!("the clients got {sent} bytes out; bound {bound}")
    });
    // The sharp check: the psock backlogs, which only the pool bounds. Each direction's is
    // within its allowance; all together within the pool (57 MiB), where 50 allowances of
    // `max_buffered` would come to 200 MiB.
    let uncharged: Vec<i64> = snaps
        .iter()
        .zip(&pushers)
        .map(|(s, p)| s.uncharged(p.sent))
        .collect();
    let most = uncharged.iter().max().unwrap();
    uncharged_within(
        &mut checks,
        &format!("{MANY} stalled, the most of one connection"),
        *most,
        MANY_EACH,
    );
    uncharged_within(
        &mut checks,
        &format!("{MANY} stalled, all together"),
        uncharged.iter().sum(),
        pool + (MANY as u64 - 1) * UNCHARGED_SLACK,
    );
    // Memory: the sockets' charge is bounded by their buffers (truesize, as in the bound above);
    // the psock backlogs are charged to no socket and bounded by the pool, half as much again
    // for the skbs' overhead; 32 MiB for 100 sockets' and psocks' structures, the daemon, and
    // the noise of a shared machine (tens of MiB). This catches a runaway (trap 8: GBs), not
    // the difference the pool makes at this scale: the byte counts above do.
    let mem_bound = bufs.sockets() + pool * 3 / 2 + 32 * MIB;
    mem_within(&mut checks, &format!("{MANY} stalled"), &mem, mem_bound);
    checks.done(&format!("{MANY} stalled"))?;

    // Every upstream reads everything, in turn; each client's FIN follows its last byte.
    let t = Instant::now();
    for (i, (c, p)) in conns.iter_mut().zip(&pushers).enumerate() {
        let reader = drain(c.upstream.try_clone().unwrap());
        c.client.shutdown(Shutdown::Write).unwrap();
        let (got, sha) = reader.join().expect("reader");
        assert_eq!(got, p.sent, "connection {i}: bytes read after the stall");
        assert_eq!(sha, p.sha256(), "connection {i}: SHA-256 after the stall");
        c.upstream.shutdown(Shutdown::Write).unwrap();
        closed_within(&mut c.client, Duration::from_secs(10));
    }
    eprintln!(
        "{MANY} stalled: all read to EOF, SHA-256 equal, in {:.1} s; test took {:.1} s",
        t.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let log = fwd.spliced.wait_log("connection closed", MANY, LOG);
    let mut logged: Vec<String> = closed_lines(&log)
        .into_iter()
        .map(|l| {
            assert!(
                l.contains("path=sockmap") && l.contains("end=complete"),
                "not a complete sockmap connection: {l}"
            );
            fields(l)["bytes_up"].to_string()
        })
        .collect();
    let mut expected: Vec<String> = pushers.iter().map(|p| p.sent.to_string()).collect();
    logged.sort();
    expected.sort();
    assert_eq!(logged, expected, "bytes_up of the {MANY} connections");
    Ok(())
}

// ---- 4: a slow reader ------------------------------------------------------------------------

/// The slow reader's pace and how long it keeps it.
const SLOW_RATE: u64 = 10_000_000;
const SLOW_FOR: Duration = Duration::from_secs(10);
/// The reader keeps its pace this much longer than the client pushes, so that the queues are
/// still draining slowly when they are looked at.
const SLOW_PACE: Duration = Duration::from_secs(12);

/// Reads `s` at `rate` bytes/s for `pace`, publishing its count in `read`, then at full speed
/// to EOF. Returns (bytes, SHA-256, bytes read while pacing).
fn paced_reader(
    mut s: TcpStream,
    rate: u64,
    pace: Duration,
    read: Arc<AtomicU64>,
) -> thread::JoinHandle<(u64, [u8; 32], u64)> {
    thread::spawn(move || {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let t0 = Instant::now();
        let mut paced = None;
        for _ in 0..MAX_ROUNDS {
            let elapsed = t0.elapsed();
            let want = if elapsed < pace {
                let due = (rate as f64 * elapsed.as_secs_f64()) as u64;
                let want = due.saturating_sub(total).min(buf.len() as u64) as usize;
                if want < 16 * 1024 {
                    thread::sleep(Duration::from_millis(2));
                    continue;
                }
                want
            } else {
                if paced.is_none() {
                    paced = Some(total);
                    s.set_read_timeout(Some(IO)).unwrap();
                }
                buf.len()
            };
            match s.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => {
                    hash.update(&buf[..n]);
                    total += n as u64;
                    read.store(total, Ordering::Relaxed);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut
                    ) && paced.is_none() => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("slow reader after {total} bytes: {e}"),
            }
        }
        let paced = paced.expect("the sender's FIN came before the pace ended");
        (total, hash.finalize().into(), paced)
    })
}

/// The upstream reads at 10 MB/s for 10 s while the client pushes as fast as it can.
#[test]
fn slow_reader_sockmap() {
    attempts("sockmap slow reader", || slow_reader("sockmap"));
}

fn slow_reader(mode: &str) -> Result<(), String> {
    let started = Instant::now();
    let Some(mut setup) = Forward::start(mode, &[]) else {
        return Ok(());
    };
    let mem = MemWatch::start(&Ours::of(&setup));
    let mut conn = Conn::open(&setup);
    let read = Arc::new(AtomicU64::new(0));
    let reader = paced_reader(
        conn.upstream.try_clone().unwrap(),
        SLOW_RATE,
        SLOW_PACE,
        read.clone(),
    );
    let mut pusher = Pusher::new(4);
    let mut in_flight = 0u64;
    pusher.push_for(&mut conn.client, SLOW_FOR, |sent| {
        in_flight = in_flight.max(sent.saturating_sub(read.load(Ordering::Relaxed)));
    });
    let mem = mem.finish();
    setup.spliced.assert_running();
    let before = read.load(Ordering::Relaxed);
    let snap = Snapshot::take(&conn, Dir::Upload);
    let after = read.load(Ordering::Relaxed);
    let now_in_flight = pusher.sent - before;
    conn.client.shutdown(Shutdown::Write).unwrap();
    let (got, sha, paced) = reader.join().expect("slow reader");
    // The receiver's buffer autotunes while it reads: measured at the end, it is its largest.
    // One read buffer more: the count is published after each read.
    let bound = snap.bufs.bound(MAX_BUFFERED) + 64 * 1024;
    let what = format!("{mode} slow reader");
    eprintln!(
        "{what}: the client got {} out in {SLOW_FOR:?} ({:.1} MB/s); the reader read {} while \
         pacing ({:.1} MB/s, target {:.1}); most in flight {} (bound {} = {:?} + allowance {})",
        mib(pusher.sent),
        pusher.sent as f64 / SLOW_FOR.as_secs_f64() / 1e6,
        mib(paced),
        paced as f64 / SLOW_PACE.as_secs_f64() / 1e6,
        SLOW_RATE as f64 / 1e6,
        mib(in_flight),
        mib(bound),
        snap.bufs,
        mib(MAX_BUFFERED)
    );
    eprintln!("{what}: at the end: {}", snap.describe(now_in_flight));
    let mut checks = Checks::default();
    // While the queues are looked at one after the other, the reader goes on: what it read
    // meanwhile counts as slack.
    uncharged_within(
        &mut checks,
        &what,
        snap.uncharged(now_in_flight) - (after - before) as i64,
        MAX_BUFFERED,
    );
    // Memory, as for the stalled connections: the sockets' charge is bounded by their buffers,
    // the psock backlog (charged to no socket) by the allowance, half as much again for the
    // skbs' overhead, plus the noise of a shared machine: 64 MiB, since one build measured
    // 27-77 MiB in five runs by hand (20.5-21.9 in the sockets, the rest charged to none,
    // others quiet), 2fcb039 29-39 MiB, and a fixed 64 MiB failed once in CI at 66.4. This
    // catches a runaway (trap 8: GBs); the byte counts above hold the allowance.
    let mem_bound = snap.bufs.sockets() + MAX_BUFFERED * 3 / 2 + 64 * MIB;
    mem_within(&mut checks, &what, &mem, mem_bound);
    checks.check(in_flight < bound, || {
        format!("{in_flight} bytes in flight, bound {bound}")
    });
    let floor = SLOW_RATE as f64 * SLOW_PACE.as_secs_f64() / 2.0;
    checks.check(paced as f64 > floor, || {
        format!("the reader got only {paced} bytes in {SLOW_PACE:?} (at least {floor} expected)")
    });
    checks.done(&what)?;
    assert_eq!(got, pusher.sent, "{what}: bytes read");
    assert_eq!(sha, pusher.sha256(), "{what}: SHA-256");
    conn.upstream.shutdown(Shutdown::Write).unwrap();
    closed_within(&mut conn.client, Duration::from_secs(10));
    setup.spliced.assert_closed(0, Some(mode), got, 0);
    eprintln!("{what}: test took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

// ---- 5: the client's FIN while stalled -------------------------------------------------------

/// How long the upstream does not read after the client's FIN.
const FIN_STALL: Duration = Duration::from_secs(3);

/// The client sends `len` bytes and SHUT_WR while the upstream reads nothing for
/// [`FIN_STALL`]; then the upstream reads everything and the FIN, and replies. With
/// `client_sndbuf` the client's send buffer is enlarged so that the whole stream and the FIN fit
/// in it (SHUT_WR returns while most of the stream still waits in the client).
fn fin_while_stalled(len: u64, client_sndbuf: Option<u64>) {
    let mode = "sockmap";
    let _serial = serial();
    let started = Instant::now();
    let Some(mut setup) = Forward::start(mode, &[]) else {
        return;
    };
    let what = format!("{mode} FIN while stalled, {}", mib(len));
    let conn = Conn::open(&setup);
    if let Some(b) = client_sndbuf {
        set_sndbuf_force(&conn.client, b / 2);
    }
    let shut = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut c = conn.client.try_clone().unwrap();
        let shut = shut.clone();
        thread::spawn(move || {
            let sha = Payload::new(len, 5).send(&mut c).expect("client write");
            c.shutdown(Shutdown::Write).unwrap();
            shut.store(true, Ordering::SeqCst);
            let mut reply = Vec::new();
            c.read_to_end(&mut reply)
                .expect("client reads the reply to EOF");
            (sha, reply)
        })
    };
    thread::sleep(FIN_STALL);
    setup.spliced.assert_running();
    let shut_in_time = shut.load(Ordering::SeqCst);
    let snap = Snapshot::take(&conn, Dir::Upload);
    eprintln!(
        "{what}: after {FIN_STALL:?} the client's SHUT_WR {}; the daemon's client socket is \
         {}; {}",
        if shut_in_time {
            "was done"
        } else {
            "was not done yet"
        },
        snap.proxy_rcv.state,
        snap.describe(len)
    );
    assert!(
        shut_in_time,
        "{what}: the client could not send {len} bytes and SHUT_WR while the upstream did not read"
    );
    let mut upstream = conn.upstream;
    let client = || writer.join().expect("client");
    reply_after_fin(&what, started, &setup.spliced, &mut upstream, len, client);
}

/// What the upstream replies once it has read the client's FIN.
const REPLY: &[u8] = b"reply after the client's FIN";

/// The end of the FIN tests, on sockmap: the upstream reads to EOF and replies [`REPLY`] and its
/// FIN; `client` returns (the SHA-256 the client sent, what it then read to EOF). Asserts the
/// upstream got `len` bytes with that SHA-256, the client the reply, and the daemon's log line.
fn reply_after_fin(
    what: &str,
    started: Instant,
    spliced: &Spliced,
    upstream: &mut TcpStream,
    len: u64,
    client: impl FnOnce() -> ([u8; 32], Vec<u8>),
) {
    let t = Instant::now();
    let (got, sha) = receive(upstream).expect("upstream reads to EOF");
    assert_eq!(got, len, "{what}: bytes before the FIN");
    upstream.write_all(REPLY).unwrap();
    upstream.shutdown(Shutdown::Write).unwrap();
    let (sent_sha, reply) = client();
    assert_eq!(sha, sent_sha, "{what}: SHA-256");
    assert_eq!(reply, REPLY, "{what}: the reply after the FIN");
    eprintln!(
        "{what}: the upstream read {got} bytes and EOF in {:.2} s, the client got the reply and \
         EOF; test took {:.1} s",
        t.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    spliced.assert_closed(0, Some("sockmap"), len, REPLY.len() as u64);
}

mod fin_while_stalled {
    use super::MIB;

    /// The stream fits into what the daemon takes while stalled: the FIN reaches it.
    #[test]
    fn sockmap_16mib() {
        super::fin_while_stalled(16 * MIB, None)
    }

    /// Far more than the daemon takes: most of it and the FIN wait in the client's send buffer
    /// (enlarged) behind held bytes.
    #[test]
    fn sockmap_48mib() {
        super::fin_while_stalled(48 * MIB, Some(64 * MIB))
    }
}

/// The client's FIN reaches the daemon while bytes are held on its client socket: the client
/// pushes until the verdict holds (the daemon's client socket is charged bytes that the client's
/// send queue no longer has), then SHUT_WR; the upstream reads nothing for [`FIN_STALL`].
#[test]
fn fin_while_held_sockmap() {
    let mode = "sockmap";
    let _serial = serial();
    let started = Instant::now();
    let Some(mut setup) = Forward::start(mode, &[]) else {
        return;
    };
    let what = format!("{mode} FIN while held");
    let mut conn = Conn::open(&setup);
    let mut pusher = Pusher::new(6);
    conn.client.set_nonblocking(true).unwrap();
    // Fill most of the daemon's send queue and allowance at once, then go on 64 KiB at a time,
    // each time until the client's send queue is empty, until the daemon holds bytes.
    let fast = (SEND_BUFFER + MAX_BUFFERED) * 7 / 8;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut held = 0;
    for _ in 0..MAX_ROUNDS {
        if Instant::now() > deadline {
            break;
        }
        let step = if pusher.sent < fast {
            fast - pusher.sent
        } else {
            // Wait (at most 1 s) until the daemon has taken all that was sent.
            for _ in 0..1_000 {
                if outq(&conn.client) == 0 {
                    break;
                }
                thread::sleep(Duration::from_millis(1));
            }
            held = conn.proxy_client().r;
            if held > 0 || outq(&conn.client) > 0 {
                break;
            }
            64 * 1024
        };
        let chunk = pusher.payload.chunk(pusher.sent);
        let chunk = &chunk[..chunk.len().min(step as usize)];
        match conn.client.write(chunk) {
            Ok(n) => {
                pusher.hash.update(&chunk[..n]);
                pusher.sent += n as u64;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                wait_writable(&[conn.client.as_raw_fd()], Duration::from_millis(10));
            }
            Err(e) => panic!("client write: {e}"),
        }
    }
    assert!(
        held > 0 && outq(&conn.client) == 0,
        "{what}: the daemon never held bytes with the client's send queue empty (sent {}, held \
         {held})",
        pusher.sent
    );
    conn.client.set_nonblocking(false).unwrap();
    conn.client.shutdown(Shutdown::Write).unwrap();
    thread::sleep(FIN_STALL);
    setup.spliced.assert_running();
    let snap = Snapshot::take(&conn, Dir::Upload);
    eprintln!(
        "{what}: the client sent {} ({} bytes) and SHUT_WR when the daemon held {}; {FIN_STALL:?} \
         later the daemon's client socket is {}; {}",
        mib(pusher.sent),
        pusher.sent,
        mib_i(held),
        snap.proxy_rcv.state,
        snap.describe(pusher.sent)
    );
    assert_eq!(
        snap.proxy_rcv.state, "CLOSE-WAIT",
        "{what}: the client's FIN did not reach the daemon"
    );
    assert!(
        snap.proxy_rcv.r > 0,
        "{what}: nothing held any more, though the upstream has not read"
    );
    let client = || {
        let mut reply = Vec::new();
        conn.client
            .read_to_end(&mut reply)
            .expect("client reads the reply to EOF");
        (pusher.sha256(), reply)
    };
    reply_after_fin(
        &what,
        started,
        &setup.spliced,
        &mut conn.upstream,
        pusher.sent,
        client,
    );
}
