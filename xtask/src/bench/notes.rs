//! What the report says below the table: remarks as the run makes them, the TIME_WAIT each
//! short-connection case left, the cross-core wake-ups of a round trip, and the idle-connection
//! counts a contender could not get past.
use super::{client::Closer, contenders::Contender, report, shorts::TimeWait};

/// What the report says below the table: remarks in order, and the connection counts each
/// contender could not get past, one line per contender.
#[derive(Default)]
pub struct Notes {
    pub lines: Vec<String>,
    caps: Vec<(Contender, Vec<Cap>)>,
    /// Connections spliced broke (reset, or left hanging): a bug, not a slow figure. The bench
    /// still writes its report, then fails.
    pub spliced_broke: Vec<String>,
    /// TIME_WAIT left by each short-connection case, per contender and round.
    pub time_wait: Vec<(Closer, Contender, TimeWait)>,
    /// Cross-core wake-ups per round trip, per contender and round (`wakeups::count`).
    pub wakeups: Vec<(Contender, f64)>,
}

impl Notes {
    /// One line per short-connection case: the TIME_WAIT sockets it left on the host, per
    /// contender, the median over the rounds.
    fn time_wait_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (how, what) in [
            (Closer::Upstream, "short conn/s (the upstream closes first)"),
            (Closer::Client, "short conn/s client closes first"),
        ] {
            let mut parts = Vec::new();
            for c in Contender::ALL {
                let tw: Vec<&TimeWait> = self
                    .time_wait
                    .iter()
                    .filter(|(h, k, _)| *h == how && *k == c)
                    .map(|(_, _, t)| t)
                    .collect();
                if tw.is_empty() {
                    continue;
                }
                let med = |f: fn(&TimeWait) -> usize| {
                    let mut v: Vec<usize> = tw.iter().map(|t| f(t)).collect();
                    v.sort_unstable();
                    report::group(v[v.len() / 2] as u64)
                };
                parts.push(format!(
                    "{} {} / {} / {}",
                    c.name(),
                    med(|t| t.upstream_side),
                    med(|t| t.client),
                    med(|t| t.forwarder_client_side)
                ));
            }
            if !parts.is_empty() {
                out.push(format!(
                    "TIME_WAIT sockets on the host that the {what} case left (growth over the \
                     case, median over the rounds): toward the upstream's port (the forwarder's \
                     upstream sockets, which hold its ephemeral ports; direct: the client's) / \
                     the client's toward the forwarder / the forwarder's accepted sockets: {}.",
                    parts.join("; ")
                ));
            }
        }
        out
    }

    /// The cross-core wake-ups a round trip took, per contender, the median over the rounds.
    fn wakeup_line(&self) -> Option<String> {
        let parts: Vec<String> = Contender::ALL
            .iter()
            .filter_map(|&c| {
                let v: Vec<f64> = self
                    .wakeups
                    .iter()
                    .filter(|(k, _)| *k == c)
                    .map(|(_, w)| *w)
                    .collect();
                (!v.is_empty()).then(|| format!("{} {:.2}", c.name(), report::median(v)))
            })
            .collect();
        (!parts.is_empty()).then(|| {
            format!(
                "Cross-core wake-ups per round trip (the rescheduling and function-call IPIs of \
                 every core, /proc/interrupts, over each contender's round-trip connections, \
                 set-up included; the median over the rounds; machine-wide, so other work on the \
                 machine adds to it): {}.",
                parts.join("; ")
            )
        })
    }
}

/// A contender stuck below a target: round, connections held, the target, why the next failed.
type Cap = (usize, usize, usize, String);

impl Notes {
    pub fn push(&mut self, line: String) {
        self.lines.push(line);
    }

    /// A remark that `c` broke connections; for spliced, also a failure of the run.
    pub fn broke(&mut self, c: Contender, line: String) {
        if c.is_spliced() {
            self.spliced_broke.push(line.clone());
        }
        self.lines.push(line);
    }

    pub fn cap(&mut self, c: Contender, round: usize, held: usize, target: usize, why: String) {
        let entry = match self.caps.iter().position(|(k, _)| *k == c) {
            Some(i) => &mut self.caps[i].1,
            None => {
                self.caps.push((c, Vec::new()));
                &mut self.caps.last_mut().expect("just pushed").1
            }
        };
        entry.push((round, held, target, why));
    }

    /// Every line, the TIME_WAIT and capacity ones last.
    pub fn lines(&self) -> Vec<String> {
        let mut out = self.lines.clone();
        out.extend(self.time_wait_lines());
        out.extend(self.wakeup_line());
        for (c, caps) in &self.caps {
            let held: Vec<String> = caps
                .iter()
                .map(|(_, n, _, _)| report::group(*n as u64))
                .collect();
            let rounds: Vec<String> = caps.iter().map(|(r, ..)| r.to_string()).collect();
            let (_, _, target, why) = &caps[0];
            out.push(format!(
                "{} could not hold {} idle connections: it held {} (rounds {}), then the next \
                 connection failed: {why}",
                c.name(),
                report::group(*target as u64),
                held.join(", "),
                rounds.join(", ")
            ));
        }
        out
    }
}

/// The first line of an error chain and its causes, cut to a readable length.
pub fn short_error(e: &anyhow::Error) -> String {
    let s = format!("{e:#}").replace('\n', " ");
    if s.chars().count() > 400 {
        format!("{}…", s.chars().take(400).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wake_up_line_gives_each_contenders_median_in_table_order() {
        let mut notes = Notes::default();
        assert_eq!(notes.wakeup_line(), None);
        notes.wakeups = vec![
            (Contender::Socat, 3.5),
            (Contender::Auto, 2.0),
            (Contender::Auto, 1.0),
            (Contender::Auto, 4.0),
        ];
        let line = notes.wakeup_line().unwrap();
        let want = format!(
            "{} 2.00; {} 3.50.",
            Contender::Auto.name(),
            Contender::Socat.name()
        );
        assert!(line.ends_with(&want), "{line}");
    }
}
