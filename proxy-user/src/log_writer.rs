//! The daemon's log writer: once the daemon runs, formatted lines go to a buffer that a thread
//! of its own writes out (before that, and at the end, each line is written at once). Lines the
//! caller marks as bulk (one per connection) wait up to [`FLUSH_EVERY`] and go out
//! many to a `write`; every other line (warnings, errors, start-up, reload) goes out at once,
//! after the bulk lines before it, so the order holds. A blocked stderr (a stalled journald)
//! stalls that thread, never a connection: past [`MAX_BUFFERED`] lines are dropped and counted.
//!
//! Hand-written because tracing-appender's non-blocking writer wakes its thread and writes once
//! per line: on short connections the per-connection line cost about a tenth of the daemon's CPU,
//! most of it that `write`.
use std::{
    io::Write,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread::JoinHandle,
    time::Duration,
};

use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;

/// The longest a bulk line waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Buffered bytes at which the thread writes without waiting for [`FLUSH_EVERY`].
const HIGH_WATER: usize = 64 * 1024;

/// Buffered bytes past which lines are dropped (counted, and the count logged).
const MAX_BUFFERED: usize = 4 * 1024 * 1024;

/// Which lines may wait: true for a line that goes out within [`FLUSH_EVERY`].
pub type Bulk = fn(&Metadata<'_>) -> bool;

/// The `MakeWriter` for `tracing_subscriber::fmt`: writes each line at once until
/// [`LogWriter::start_buffering`], and after its [`Flusher`] is dropped.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
    bulk: Bulk,
}

/// Ends the writer's thread once everything logged before is written; hold it until exit.
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Locked for each write, so that batches and lines go out in the order they were taken.
    out: Mutex<Box<dyn Write + Send>>,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// The thread runs: lines go to `buf`.
    buffering: bool,
    /// A line that must not wait is buffered.
    urgent: bool,
    /// Lines dropped since the last write.
    dropped: u64,
    closing: bool,
}

/// Locks `m`: a panic while holding one of these locks leaves whole bytes behind, and the log
/// must go on.
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LogWriter {
    /// A writer to `out`; `bulk` says which lines may wait once buffering starts.
    pub fn new(out: impl Write + Send + 'static, bulk: Bulk) -> LogWriter {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            wake: Condvar::new(),
            out: Mutex::new(Box::new(out)),
        });
        LogWriter { shared, bulk }
    }

    /// Starts the thread that writes from now on. The thread has the credentials of the one
    /// calling this: call it after a privilege drop, which must reach every thread (privdrop).
    pub fn start_buffering(&self) -> std::io::Result<Flusher> {
        let shared = self.shared.clone();
        lock(&shared.state).buffering = true;
        let thread = std::thread::Builder::new()
            .name("log".into())
            .spawn(move || run(&shared));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                lock(&self.shared.state).buffering = false;
                return Err(e);
            }
        };
        Ok(Flusher {
            shared: self.shared.clone(),
            thread: Some(thread),
        })
    }
}

/// The thread: waits for a line, then (for bulk lines) up to [`FLUSH_EVERY`] for more, and
/// writes what is buffered in one go.
fn run(shared: &Shared) {
    let mut batch = Vec::with_capacity(HIGH_WATER);
    loop {
        let mut s = lock(&shared.state);
        s = shared
            .wake
            .wait_while(s, |s| s.buf.is_empty() && !s.urgent && !s.closing)
            .unwrap_or_else(PoisonError::into_inner);
        let waits = |s: &mut State| !s.urgent && !s.closing && s.buf.len() < HIGH_WATER;
        s = shared
            .wake
            .wait_timeout_while(s, FLUSH_EVERY, waits)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        s.urgent = false;
        std::mem::swap(&mut s.buf, &mut batch);
        let dropped = std::mem::take(&mut s.dropped);
        let closing = s.closing;
        // The last batch: lines after it are written at once, and after it (`out` is taken
        // before `state` is let go).
        s.buffering = !closing;
        let mut out = lock(&shared.out);
        drop(s);
        // Errors are dropped: there is nowhere else to report them.
        let _ = out.write_all(&batch);
        batch.clear();
        if dropped > 0 {
            let _ = writeln!(
                out,
                "spliced: {dropped} log line(s) dropped: stderr took no more while \
                 {MAX_BUFFERED} bytes waited (is journald or the log's reader stalled?)"
            );
        }
        let _ = out.flush();
        if closing {
            return;
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        lock(&self.shared.state).closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        lock(&self.shared.state).closing = false;
    }
}

/// One line's writer.
pub struct Line<'a> {
    shared: &'a Shared,
    urgent: bool,
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut s = lock(&self.shared.state);
        if !s.buffering {
            drop(s);
            // All of it under one lock: the line is not split by another thread's.
            return lock(&self.shared.out)
                .write_all(bytes)
                .map(|()| bytes.len());
        }
        if s.buf.len() + bytes.len() > MAX_BUFFERED {
            s.dropped += 1;
            return Ok(bytes.len());
        }
        let was_empty = s.buf.is_empty();
        s.buf.extend_from_slice(bytes);
        let wake = if self.urgent {
            s.urgent = true;
            true
        } else {
            was_empty || s.buf.len() >= HIGH_WATER
        };
        drop(s);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            shared: &self.shared,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line<'a> {
        Line {
            shared: &self.shared,
            urgent: !(self.bulk)(meta),
        }
    }
}

#[cfg(test)]
#[path = "log_writer_tests.rs"]
mod tests;
