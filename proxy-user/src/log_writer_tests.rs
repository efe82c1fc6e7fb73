use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use super::*;

/// The writer's output: each `write` call's bytes; `gate` (when locked by the test) blocks
/// every write until it is unlocked, like a stalled reader of stderr.
#[derive(Clone, Default)]
struct Sink {
    writes: Arc<Mutex<Vec<Vec<u8>>>>,
    gate: Arc<Mutex<()>>,
}

impl Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let _open = self.gate.lock().unwrap();
        self.writes.lock().unwrap().push(bytes.to_vec());
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn text(&self) -> String {
        String::from_utf8(self.writes.lock().unwrap().concat()).unwrap()
    }
}

/// A fmt subscriber writing through `writer`, without colours.
fn subscriber(writer: LogWriter) -> impl tracing::Subscriber {
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .finish()
}

/// Runs `f` with a fmt subscriber writing through a [`LogWriter`] to `sink`, where the lines of
/// target `bulk` may wait; returns after the [`Flusher`] is dropped.
fn logging(sink: &Sink, f: impl FnOnce()) {
    let writer = LogWriter::new(sink.clone(), |m| m.target() == "bulk");
    let flusher = writer.start_buffering().unwrap();
    tracing::subscriber::with_default(subscriber(writer), f);
    drop(flusher);
}

#[test]
fn every_line_is_written_in_order_by_the_exit() {
    let sink = Sink::default();
    logging(&sink, || {
        for i in 0..500 {
            info!(target: "bulk", "connection {i}");
            if i % 100 == 99 {
                warn!("after connection {i}");
            }
        }
    });
    let text = sink.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 505, "{text}");
    let mut next = 0;
    for line in lines {
        if let Some(after) = line.split("after connection ").nth(1) {
            assert_eq!(after.parse::<i32>().unwrap(), next - 1, "{line}");
        } else {
            let n = line.split("connection ").nth(1).unwrap();
            assert_eq!(n.parse::<i32>().unwrap(), next, "{line}");
            next += 1;
        }
    }
}

#[test]
fn bulk_lines_share_writes() {
    let sink = Sink::default();
    logging(&sink, || {
        for i in 0..1000 {
            info!(target: "bulk", "connection {i}");
        }
    });
    let writes = sink.writes.lock().unwrap().len();
    assert_eq!(sink.text().lines().count(), 1000);
    // Written in a loop far shorter than FLUSH_EVERY: a few writes, not one per line.
    assert!(writes < 100, "{writes} writes for 1000 lines");
}

#[test]
fn a_stalled_reader_drops_lines_and_says_how_many() {
    let sink = Sink::default();
    let gate = sink.gate.clone();
    let closed = gate.lock().unwrap();
    let writer = LogWriter::new(sink.clone(), |_| true);
    let flusher = writer.start_buffering().unwrap();
    let mut line = vec![b'x'; 1023];
    line.push(b'\n');
    // The thread takes what is buffered when it wakes (any number of lines) and blocks writing
    // it; the lines after it fill the buffer and overflow.
    let lines = 2 * MAX_BUFFERED / 1024;
    for _ in 0..lines {
        writer.make_writer().write_all(&line).unwrap();
    }
    drop(closed);
    drop(flusher);
    let text = sink.text();
    let kept = text.lines().filter(|l| l.starts_with('x')).count();
    assert!(kept < lines, "{kept} of {lines} kept");
    let note = text
        .lines()
        .find(|l| l.contains("dropped"))
        .expect(&text[..200]);
    let dropped: usize = note.split(' ').nth(1).unwrap().parse().unwrap();
    assert_eq!(kept + dropped, lines, "{note}");
}

#[test]
fn lines_are_written_at_once_before_and_after_buffering() {
    let sink = Sink::default();
    let writer = LogWriter::new(sink.clone(), |_| true);
    tracing::subscriber::with_default(subscriber(writer.clone()), || {
        info!("starting");
        assert_eq!(sink.writes.lock().unwrap().len(), 1);
        let flusher = writer.start_buffering().unwrap();
        for i in 0..10 {
            info!("connection {i}");
        }
        drop(flusher);
        assert_eq!(sink.text().lines().count(), 11);
        let writes = sink.writes.lock().unwrap().len();
        info!("stopped");
        assert_eq!(sink.writes.lock().unwrap().len(), writes + 1);
        assert!(sink.text().ends_with("stopped\n"), "{}", sink.text());
    });
}
