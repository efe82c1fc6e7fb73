//! The userspace data paths: `splice` (splice(2) through a pipe, no copy into userspace) and
//! `copy` (a userspace buffer). Used where sockmap is unavailable, and for connections sockmap
//! cannot take (a socket no longer ESTABLISHED at insert time, sockmap.md trap 4).
use std::{
    cell::Cell,
    future::Future,
    io,
    mem::MaybeUninit,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    pin::pin,
    sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering},
    task::Poll,
    time::Duration,
};

use rustix::pipe::{self, PipeFlags, SpliceFlags};
use tokio::{io::Interest, net::TcpStream};
use tokio_util::sync::CancellationToken;

use super::{pin, End, Outcome};
use crate::sockopt;

/// Moves bytes from a socket into an intermediate store and out to another socket.
trait Mover {
    /// Bytes held, read from the source and not yet written.
    fn pending(&self) -> usize;
    /// Reads from `src` into the store (only called when it is empty). 0 is EOF.
    fn fill(&mut self, src: BorrowedFd<'_>) -> io::Result<usize>;
    /// Writes from the store to `dst`.
    fn drain(&mut self, dst: BorrowedFd<'_>) -> io::Result<usize>;
    /// The most one `fill` reads.
    fn capacity(&self) -> usize;
}

fn ret(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A userspace buffer, taken for a fill and given back once drained: an idle connection holds
/// none (9,000 idle connections took 960 MiB with two buffers each allocated up front).
struct Buffer {
    buf: Option<Box<[MaybeUninit<u8>]>>,
    start: usize,
    end: usize,
}

thread_local! {
    /// One drained buffer kept per thread for the next fill. A short connection fills and
    /// drains four times (request, response, two FINs), and glibc consolidated its heap at
    /// every free of a 256 KiB block: malloc and free were ~1.8 % of the daemon's CPU per
    /// short connection (issue 17's profile). No zeroing either way.
    static SPARE: Cell<Option<Box<[MaybeUninit<u8>]>>> = const { Cell::new(None) };
}

impl Buffer {
    const SIZE: usize = 256 * 1024;
    fn new() -> Self {
        Buffer {
            buf: None,
            start: 0,
            end: 0,
        }
    }

    /// The thread's spare buffer, or a new one.
    fn take() -> Box<[MaybeUninit<u8>]> {
        SPARE
            .take()
            .unwrap_or_else(|| Box::new_uninit_slice(Self::SIZE))
    }

    /// Gives the buffer back as the thread's spare (the one it replaces, if any, is freed).
    fn release(&mut self) {
        if let Some(buf) = self.buf.take() {
            SPARE.set(Some(buf));
        }
    }
}

// recv and send stay libc calls: recv writes into the uninitialised buffer and send needs
// MSG_NOSIGNAL; rustix would add conversions, not remove code.
impl Mover for Buffer {
    fn pending(&self) -> usize {
        self.end - self.start
    }
    fn fill(&mut self, src: BorrowedFd<'_>) -> io::Result<usize> {
        let src = src.as_raw_fd();
        let buf = self.buf.get_or_insert_with(Self::take);
        // SAFETY: the buffer is valid for writes of its length; recv only writes into it.
        let n = ret(unsafe { libc::recv(src, buf.as_mut_ptr().cast(), buf.len(), 0) });
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                self.release();
                return Err(e);
            }
        };
        (self.start, self.end) = (0, n);
        if n == 0 {
            self.release();
        }
        Ok(n)
    }
    fn capacity(&self) -> usize {
        Self::SIZE
    }
    fn drain(&mut self, dst: BorrowedFd<'_>) -> io::Result<usize> {
        let dst = dst.as_raw_fd();
        let Some(buf) = &self.buf else {
            return Ok(0);
        };
        let data = &buf[self.start..self.end];
        // SAFETY: `data` lies within the `end` bytes the last recv initialised.
        let n =
            ret(unsafe { libc::send(dst, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) })?;
        self.start += n;
        if self.start == self.end {
            self.release();
        }
        Ok(n)
    }
}

/// A pipe between two splice(2) calls.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    held: usize,
}

impl Pipe {
    /// 1 MiB, the default `pipe-max-size`; the kernel's 64 KiB default costs throughput.
    const SIZE: usize = 1 << 20;

    fn new() -> io::Result<Self> {
        let (read, write) = pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // On failure the pipe keeps its default size.
        let capacity = pipe::fcntl_setpipe_size(&write, Self::SIZE).unwrap_or(64 * 1024);
        Ok(Pipe {
            read,
            write,
            capacity,
            held: 0,
        })
    }
}

impl Pipe {
    /// After a splice's EAGAIN. splice(2) never reads past TCP urgent data (tcp_read_sock stops
    /// at the urgent mark and returns nothing there), so a sender's `send(MSG_OOB)` would stop
    /// this direction for good, every later byte queued behind the mark (measured: nothing after
    /// the urgent byte arrived). At the mark the urgent byte is read in line and written into the
    /// (empty) pipe, and the next splice goes on after it. One `ioctl` per EAGAIN otherwise.
    fn past_urgent_mark(&mut self, src: BorrowedFd<'_>) -> io::Result<usize> {
        if !sockopt::at_urgent_mark(&src)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        sockopt::set_urgent_inline(&src)?;
        let mut byte = [0u8; 1];
        match sockopt::recv_nonblocking(src.as_raw_fd(), &mut byte)? {
            // The mark's byte has not arrived yet.
            None => Err(io::ErrorKind::WouldBlock.into()),
            Some(0) => Ok(0),
            Some(_) => {
                let n = rustix::io::write(&self.write, &byte)?;
                self.held += n;
                Ok(n)
            }
        }
    }
}

/// Sockets and pipes have no offsets; move pages rather than copy them; never block.
const SPLICE: SpliceFlags = SpliceFlags::MOVE.union(SpliceFlags::NONBLOCK);

impl Mover for Pipe {
    fn pending(&self) -> usize {
        self.held
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    fn fill(&mut self, src: BorrowedFd<'_>) -> io::Result<usize> {
        let n = match pipe::splice(src, None, &self.write, None, self.capacity, SPLICE) {
            Err(rustix::io::Errno::AGAIN) => return self.past_urgent_mark(src),
            r => r?,
        };
        self.held += n;
        Ok(n)
    }
    fn drain(&mut self, dst: BorrowedFd<'_>) -> io::Result<usize> {
        let n = pipe::splice(&self.read, None, dst, None, self.held, SPLICE)?;
        self.held -= n;
        Ok(n)
    }
}

/// Which socket a direction failed on.
enum Failed {
    Source(io::Error),
    Destination(io::Error),
}

/// Asks the pumps of a connection to stop at their next quiet point (everything read has been
/// written, nothing more read), so that the connection can move to another path. Fires when
/// the pumps together have moved `after_bytes`, or the talk has turned `after_turns` times
/// (a read in the other direction than the read before it: a request, then its response), or
/// when the driver fires it.
///
/// A flag, not a `CancellationToken`: both pumps and the driver are polled by one task, and a
/// token's wait registered and dropped a waiter under its locks at every read (0.7 % of the
/// daemon's CPU per short connection). Nothing needs waking: a fire comes from a pump's own
/// poll or from the driver's deadline branch, and either ends with a branch of
/// [`copy_then_promote`]'s `select!` completing (the firing pump reaches its quiet point and
/// returns, or the deadline's branch returns), whose next `select!` polls the other pump again,
/// which then sees the flag.
struct Pause {
    fired: AtomicBool,
    moved: AtomicU64,
    after_bytes: u64,
    /// The side of the last read ([`Side`] as a number, 0 before the first).
    last: AtomicU8,
    turns: AtomicU64,
    after_turns: u64,
}

/// Which pump read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Up = 1,
    Down = 2,
}

impl Pause {
    fn new(promotion: &Promotion) -> Pause {
        Pause {
            fired: AtomicBool::new(false),
            moved: AtomicU64::new(0),
            after_bytes: promotion.bytes,
            last: AtomicU8::new(0),
            turns: AtomicU64::new(0),
            after_turns: promotion.turns,
        }
    }

    /// Counts a read of some bytes by the pump on `side`: a turn if the last read was the
    /// other side's. A bulk transfer reads many times on one side and turns a few times at
    /// most, so it reaches `after_bytes` first, whatever the size of its reads.
    fn read(&self, side: Side) {
        let before = self.last.swap(side as u8, Ordering::Relaxed);
        if before != 0
            && before != side as u8
            && self.turns.fetch_add(1, Ordering::Relaxed) + 1 >= self.after_turns
        {
            self.fire();
        }
    }

    fn fire(&self) {
        self.fired.store(true, Ordering::Relaxed);
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::Relaxed)
    }

    /// Which limit fired (called once both pumps stopped on it).
    fn reached(&self) -> Reached {
        if self.moved.load(Ordering::Relaxed) >= self.after_bytes {
            Reached::Bytes
        } else if self.turns.load(Ordering::Relaxed) >= self.after_turns {
            Reached::Turns
        } else {
            Reached::Age
        }
    }
}

/// How a pump stopped without failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pumped {
    /// The source's FIN was forwarded.
    Eof,
    /// Stopped at a quiet point on [`Pause`]'s request; bytes may wait in the source's
    /// receive queue.
    Paused,
}

/// Ready once `pause` has fired (checked at every poll, see [`Pause`]); never without one.
fn paused(pause: Option<&Pause>) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(move |_| match pause {
        Some(p) if p.fired() => Poll::Ready(()),
        _ => Poll::Pending,
    })
}

/// Bytes one direction of a connection on the splice or copy loop carries before it counts as a
/// bulk transfer (`pin::Bulk`: its lane is unpinned until the direction ends); a short exchange
/// stays on its pinned lane. `auto` moves a connection to a bulk path after as many (its
/// `PROMOTION`).
pub const BULK_AFTER: u64 = 256 * 1024;

/// One direction: move bytes until EOF, then shut the destination's write side (half-close);
/// or, with a `pause`, until it fires. Without a pause, past [`BULK_AFTER`] bytes the direction
/// is a bulk transfer; with one, the pause ends it first.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    mover: &mut impl Mover,
    count: &AtomicU64,
    side_pause: Option<(&Pause, Side)>,
) -> Result<Pumped, Failed> {
    let pause = side_pause.map(|(p, _)| p);
    // Whether the last read took everything `src` had queued. A pause waits for that: a read
    // that filled the store may have stopped inside an skb, and the verdict program, once
    // attached, would receive that skb whole, the bytes already read included (measured: the
    // first 256 KiB of an upload delivered twice).
    let mut drained = true;
    let mut bulk = None;
    loop {
        let n = loop {
            // Quiet here: the store is empty (a fill happens only then, and drains it).
            tokio::select! {
                biased;
                () = paused(pause), if drained => return Ok(Pumped::Paused),
                r = src.readable() => r.map_err(Failed::Source)?,
            }
            match src.try_io(Interest::READABLE, || mover.fill(src.as_fd())) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Failed::Source(e)),
            }
        };
        if n == 0 {
            sockopt::shutdown_write(dst).map_err(Failed::Destination)?;
            return Ok(Pumped::Eof);
        }
        if let Some((p, side)) = side_pause {
            p.read(side);
        }
        drained = n < mover.capacity();
        while mover.pending() > 0 {
            dst.writable().await.map_err(Failed::Destination)?;
            match dst.try_io(Interest::WRITABLE, || mover.drain(dst.as_fd())) {
                Ok(n) => {
                    let carried = count.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                    if bulk.is_none() && pause.is_none() && carried >= BULK_AFTER {
                        bulk = Some(pin::Bulk::start());
                    }
                    if let Some(p) = pause {
                        let moved = p.moved.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                        if moved >= p.after_bytes {
                            p.fire();
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Failed::Destination(e)),
            }
        }
    }
}

/// Forwards through splice(2) until both directions have ended, one side failed, or `cancel`
/// fires. A direction that carries [`BULK_AFTER`] bytes is a bulk transfer (`pin::Bulk`):
/// whoever calls this (`auto`'s move to splice, a `splice` route, sockmap's fallback) may carry
/// one, or a short exchange.
pub async fn splice(client: TcpStream, upstream: TcpStream, cancel: &CancellationToken) -> Outcome {
    match (Pipe::new(), Pipe::new()) {
        (Ok(a), Ok(b)) => run(client, upstream, (a, b), cancel).await,
        (Err(e), _) | (_, Err(e)) => finish(&client, &upstream, 0, 0, End::Ours(e)),
    }
}

/// Forwards through userspace buffers, like [`splice`] (a `copy` route's connections, bulk
/// transfers or short exchanges).
pub async fn copy(client: TcpStream, upstream: TcpStream, cancel: &CancellationToken) -> Outcome {
    run(client, upstream, (Buffer::new(), Buffer::new()), cancel).await
}

async fn run(
    client: TcpStream,
    upstream: TcpStream,
    (mut up_store, mut down_store): (impl Mover, impl Mover),
    cancel: &CancellationToken,
) -> Outcome {
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let end = drive_rest(
        &client,
        &upstream,
        (&mut up_store, false),
        (&mut down_store, false),
        (&up, &down),
        cancel,
    )
    .await;
    finish(&client, &upstream, up.into_inner(), down.into_inner(), end)
}

/// The outcome; a connection that did not complete is reset on both sides, so neither peer
/// mistakes it for a clean end.
fn finish(client: &TcpStream, upstream: &TcpStream, up: u64, down: u64, end: End) -> Outcome {
    if !matches!(end, End::Complete) {
        let _ = sockopt::set_linger_zero(client);
        let _ = sockopt::set_linger_zero(upstream);
    }
    Outcome { up, down, end }
}

/// Runs the directions not yet `done` to their ends.
async fn drive_rest(
    client: &TcpStream,
    upstream: &TcpStream,
    (up_store, mut up_done): (&mut impl Mover, bool),
    (down_store, mut down_done): (&mut impl Mover, bool),
    (up, down): (&AtomicU64, &AtomicU64),
    cancel: &CancellationToken,
) -> End {
    let mut upload = pin!(pump(client, upstream, up_store, up, None));
    let mut download = pin!(pump(upstream, client, down_store, down, None));
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut upload, if !up_done => match r {
                Ok(_) => up_done = true,
                Err(Failed::Source(e)) => return End::ClientFailed(e),
                Err(Failed::Destination(e)) => return End::UpstreamFailed(e),
            },
            r = &mut download, if !down_done => match r {
                Ok(_) => down_done = true,
                Err(Failed::Source(e)) => return End::UpstreamFailed(e),
                Err(Failed::Destination(e)) => return End::ClientFailed(e),
            },
            () = cancel.cancelled() => return End::Shutdown,
        }
    }
    End::Complete
}

/// When a connection on the copy path moves on: after `bytes` in both directions together,
/// after `turns` turns of the talk (a read on the other side than the read before), or after
/// `after`, whichever comes first, at a moment when the daemon holds no byte of it and neither
/// side has sent its FIN.
#[derive(Clone, Copy, Debug)]
pub struct Promotion {
    pub bytes: u64,
    pub turns: u64,
    pub after: Duration,
}

/// Which limit of a [`Promotion`] a connection reached first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reached {
    /// `bytes` first: a bulk transfer.
    Bytes,
    /// `turns` first: request and response, many times (round trips, a chatty protocol).
    Turns,
    /// `after` first: a long-lived connection.
    Age,
}

/// What [`copy_then_promote`] ended with.
pub enum Started {
    /// The connection ended on the copy path.
    Done(Outcome),
    /// Both directions stopped at a quiet point, for the reason `by`: the sockets move to
    /// another path. `up` and `down` were carried so far.
    Promote {
        client: TcpStream,
        upstream: TcpStream,
        up: u64,
        down: u64,
        by: Reached,
    },
}

/// The copy path until `promotion` says the connection has earned a faster path's set-up cost
/// (pipes for splice, map updates and a psock for sockmap). A connection that ends first (most
/// short ones) never pays it.
pub async fn copy_then_promote(
    client: TcpStream,
    upstream: TcpStream,
    promotion: Promotion,
    cancel: &CancellationToken,
) -> Started {
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut up_store, mut down_store) = (Buffer::new(), Buffer::new());
    let pause = Pause::new(&promotion);
    let (up_pause, down_pause) = (Some((&pause, Side::Up)), Some((&pause, Side::Down)));
    let first = async {
        let mut upload = pin!(pump(&client, &upstream, &mut up_store, &up, up_pause));
        let mut download = pin!(pump(&upstream, &client, &mut down_store, &down, down_pause));
        let deadline = tokio::time::sleep(promotion.after);
        let mut deadline = pin!(deadline);
        let (mut up_state, mut down_state) = (None, None);
        while up_state.is_none() || down_state.is_none() {
            tokio::select! {
                r = &mut upload, if up_state.is_none() => match r {
                    Ok(p) => up_state = Some(p),
                    Err(Failed::Source(e)) => return Err(End::ClientFailed(e)),
                    Err(Failed::Destination(e)) => return Err(End::UpstreamFailed(e)),
                },
                r = &mut download, if down_state.is_none() => match r {
                    Ok(p) => down_state = Some(p),
                    Err(Failed::Source(e)) => return Err(End::UpstreamFailed(e)),
                    Err(Failed::Destination(e)) => return Err(End::ClientFailed(e)),
                },
                () = &mut deadline, if !pause.fired() => pause.fire(),
                () = cancel.cancelled() => return Err(End::Shutdown),
            }
        }
        Ok((
            up_state == Some(Pumped::Eof),
            down_state == Some(Pumped::Eof),
        ))
    }
    .await;
    let end = match first {
        Ok((false, false)) => {
            return Started::Promote {
                by: pause.reached(),
                client,
                upstream,
                up: up.into_inner(),
                down: down.into_inner(),
            };
        }
        // A FIN went through: a socket past ESTABLISHED cannot join sockmap (trap 4), and the
        // connection is ending anyway; the rest stays on the copy path.
        Ok((up_done, down_done)) => {
            drive_rest(
                &client,
                &upstream,
                (&mut up_store, up_done),
                (&mut down_store, down_done),
                (&up, &down),
                cancel,
            )
            .await
        }
        Err(end) => end,
    };
    Started::Done(finish(
        &client,
        &upstream,
        up.into_inner(),
        down.into_inner(),
        end,
    ))
}

#[cfg(test)]
#[path = "promotion_tests.rs"]
pub(super) mod promotion_tests;
