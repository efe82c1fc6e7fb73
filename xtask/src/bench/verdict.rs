//! Issue 17's question, answered from the rounds themselves: on each figure it names, is
//! `spliced auto` ahead of the best other forwarder, and within 5 % of the best of spliced's
//! fixed modes? Medians of a few rounds on a shared 2-core machine differ by run-to-run noise,
//! so each comparison is a ratio taken round by round (the rounds interleave the contenders,
//! so a round's two figures were measured minutes apart at most and the machine's slower drift
//! cancels), and the report gives the median ratio, its range over the rounds and how many
//! rounds `auto` won.
use std::fmt::Write as _;

use super::{
    contenders::Contender,
    report::{median, Figure, Row, Sample},
};

/// How far below spliced's best fixed mode `auto` may be on a figure (issue 17: within 5 %).
const OWN_MODE_MARGIN: f64 = 0.95;

/// The forwarders `auto` must be ahead of.
fn is_other(c: Contender) -> bool {
    matches!(c, Contender::Haproxy | Contender::Proxyd | Contender::Socat)
}

/// spliced's fixed data paths, each a mode `auto` chooses among.
fn is_fixed_mode(c: Contender) -> bool {
    matches!(c, Contender::Sockmap | Contender::Splice | Contender::Copy)
}

/// `auto` against one rival on one figure: the per-round ratios, oriented so that above 1
/// means `auto` did better (higher throughput, or less CPU).
struct Versus {
    rival: Contender,
    ratios: Vec<f64>,
}

impl Versus {
    fn median(&self) -> f64 {
        median(self.ratios.clone())
    }

    fn text(&self) -> String {
        let lo = self.ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = self.ratios.iter().copied().fold(0.0, f64::max);
        let won = self.ratios.iter().filter(|r| **r >= 1.0).count();
        format!(
            "{}: {:.2}× ({lo:.2}–{hi:.2}; auto ahead in {won} of {})",
            self.rival.name(),
            self.median(),
            self.ratios.len()
        )
    }
}

/// The rounds' values of one figure for one row, when every round produced one.
fn values(row: &Row, fig: usize) -> Option<Vec<f64>> {
    let samples = row.samples.get(fig)?;
    let v: Vec<f64> = samples
        .iter()
        .filter_map(|s| match s {
            Sample::Value(v) if *v > 0.0 => Some(*v),
            _ => None,
        })
        .collect();
    (!v.is_empty() && v.len() == samples.len()).then_some(v)
}

/// `auto` against the rival with the best median among `rows` that `pick` selects.
fn against(
    figure: &Figure,
    fig: usize,
    auto: &[f64],
    rows: &[Row],
    pick: fn(Contender) -> bool,
) -> Option<Versus> {
    let mut best: Option<(Contender, Vec<f64>)> = None;
    for row in rows
        .iter()
        .filter(|r| pick(r.contender) && r.skipped.is_none())
    {
        let Some(v) = values(row, fig).filter(|v| v.len() == auto.len()) else {
            continue;
        };
        let better = |a: f64, b: f64| if figure.higher_better { a > b } else { a < b };
        if best
            .as_ref()
            .is_none_or(|(_, b)| better(median(v.clone()), median(b.clone())))
        {
            best = Some((row.contender, v));
        }
    }
    let (rival, theirs) = best?;
    let ratios = auto
        .iter()
        .zip(&theirs)
        .map(|(a, t)| if figure.higher_better { a / t } else { t / a })
        .collect();
    Some(Versus { rival, ratios })
}

/// What the goal says of one comparison.
fn verdict(v: &Versus, needed: f64) -> &'static str {
    let won = v.ratios.iter().filter(|r| **r >= needed).count();
    if v.median() >= needed {
        "met"
    } else if won > 0 {
        "not met (within the rounds' spread)"
    } else {
        "not met (in every round)"
    }
}

/// The section for the figures at `goal` (indices into `figures`), or `None` without an
/// `auto` row that has every round of them.
pub fn section(figures: &[Figure], rows: &[Row], goal: &[usize]) -> Option<String> {
    let auto = rows.iter().find(|r| r.contender == Contender::Auto)?;
    let mut t = String::from(
        "| figure | best other forwarder: auto ×, rounds' range | goal | best fixed mode: \
         auto ×, rounds' range | within 5 % |\n|---|---|---|---|---|\n",
    );
    let mut any = false;
    for &fig in goal {
        let figure = figures.get(fig)?;
        let Some(mine) = values(auto, fig) else {
            continue;
        };
        let other = against(figure, fig, &mine, rows, is_other);
        let own = against(figure, fig, &mine, rows, is_fixed_mode);
        let show = |v: &Option<Versus>, needed| match v {
            Some(v) => (v.text(), verdict(v, needed)),
            None => ("n/a".into(), "n/a"),
        };
        let (other_text, other_verdict) = show(&other, 1.0);
        let (own_text, own_verdict) = show(&own, OWN_MODE_MARGIN);
        let _ = writeln!(
            t,
            "| {} | {other_text} | {other_verdict} | {own_text} | {own_verdict} |",
            figure.title
        );
        any = true;
    }
    any.then(|| {
        format!(
            "## auto against the field (issue 17)\n\n\
             Per figure: the best other forwarder and the best of spliced's fixed modes by \
             median, and `auto`'s ratio to each taken round by round (above 1× `auto` did \
             better: more throughput, or less CPU), as the median and the range over the \
             rounds, and how many rounds `auto` won. The goal: at or above the best other \
             forwarder, and at least {OWN_MODE_MARGIN}× of the best fixed mode. \"Within the \
             rounds' spread\": the median misses but some round meets it.\n\n{t}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(c: Contender, v: &[f64]) -> Row {
        Row {
            contender: c,
            skipped: None,
            samples: vec![v.iter().map(|x| Sample::Value(*x)).collect()],
        }
    }

    fn fig(higher_better: bool) -> Figure {
        Figure {
            title: "f".into(),
            higher_better,
            daemon_only: false,
            measured: true,
        }
    }

    #[test]
    fn ratios_are_per_round_and_oriented() {
        let rows = vec![
            row(Contender::Auto, &[10.0, 12.0, 9.0]),
            row(Contender::Haproxy, &[11.0, 10.0, 10.0]),
            row(Contender::Socat, &[1.0, 1.0, 1.0]),
            row(Contender::Splice, &[10.0, 10.0, 10.0]),
        ];
        let v = against(&fig(true), 0, &[10.0, 12.0, 9.0], &rows, is_other).unwrap();
        assert_eq!(v.rival, Contender::Haproxy);
        assert_eq!(v.ratios, vec![10.0 / 11.0, 1.2, 0.9]);
        assert_eq!(verdict(&v, 1.0), "not met (within the rounds' spread)");
        // Lower is better: the ratio is theirs over auto's.
        let v = against(&fig(false), 0, &[10.0, 12.0, 9.0], &rows, is_other).unwrap();
        assert_eq!(v.rival, Contender::Socat);
        assert_eq!(verdict(&v, 1.0), "not met (in every round)");
        let s = section(&[fig(true)], &rows, &[0]).unwrap();
        assert!(s.contains("| f | HAProxy"), "{s}");
        assert!(
            s.contains("spliced splice: 1.00× (0.90–1.20; auto ahead in 2 of 3) | met |"),
            "{s}"
        );
    }

    #[test]
    fn rows_missing_a_round_are_left_out() {
        let mut short = row(Contender::Haproxy, &[20.0, 20.0, 20.0]);
        short.samples[0][1] = Sample::Failed;
        let rows = vec![row(Contender::Auto, &[10.0, 10.0, 10.0]), short];
        assert!(against(&fig(true), 0, &[10.0, 10.0, 10.0], &rows, is_other).is_none());
        assert!(section(&[fig(true)], &rows[1..], &[0]).is_none());
    }
}
