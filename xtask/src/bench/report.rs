//! The results: medians and the markdown table (and its own parser, which checks every row has
//! every column).
use std::fmt::Write as _;

use anyhow::{bail, ensure, Context as _, Result};

use super::contenders::Contender;

/// One column of the table.
pub struct Figure {
    /// The column header.
    pub title: String,
    pub higher_better: bool,
    /// Only a forwarder has it (`direct` shows n/a).
    pub daemon_only: bool,
    /// Its case runs in this run (not: the bulk figures with `--no-bulk`, shown as `not run`).
    pub measured: bool,
}

/// One round's outcome for one figure.
#[derive(Clone, Debug)]
pub enum Sample {
    Value(f64),
    /// The contender could not hold this many connections: it stopped at this count.
    Capped(usize),
    Failed,
}

/// A contender's samples, per figure.
pub struct Row {
    pub contender: Contender,
    /// Why it was not measured at all.
    pub skipped: Option<String>,
    pub samples: Vec<Vec<Sample>>,
}

/// What a table cell shows.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Value {
        v: f64,
        ratio: Option<f64>,
    },
    NotApplicable,
    Capped(usize),
    Skipped,
    /// The figure's case is left out of this run (`--no-bulk`).
    NotRun,
    Error,
}

/// The median of `v` (the mean of the middle two for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The median of the rounds that produced a value, if they are at least as many as those that
/// hit a limit; else the limit (median count reached); else an error.
fn summarize(samples: &[Sample]) -> Cell {
    let values: Vec<f64> = samples
        .iter()
        .filter_map(|s| match s {
            Sample::Value(v) => Some(*v),
            _ => None,
        })
        .collect();
    let capped: Vec<f64> = samples
        .iter()
        .filter_map(|s| match s {
            Sample::Capped(n) => Some(*n as f64),
            _ => None,
        })
        .collect();
    if !values.is_empty() && values.len() >= capped.len() {
        Cell::Value {
            v: median(values),
            ratio: None,
        }
    } else if !capped.is_empty() {
        Cell::Capped(median(capped) as usize)
    } else {
        Cell::Error
    }
}

/// Every cell, with ratios to `direct` (the first row).
pub fn cells(figures: &[Figure], rows: &[Row]) -> Vec<Vec<Cell>> {
    let mut out: Vec<Vec<Cell>> = rows
        .iter()
        .map(|row| {
            figures
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    if row.skipped.is_some() {
                        Cell::Skipped
                    } else if !f.measured {
                        Cell::NotRun
                    } else if f.daemon_only && row.contender == Contender::Direct {
                        Cell::NotApplicable
                    } else {
                        summarize(row.samples.get(i).map_or(&[][..], |s| &s[..]))
                    }
                })
                .collect()
        })
        .collect();
    let direct: Vec<Option<f64>> = rows
        .iter()
        .position(|r| r.contender == Contender::Direct)
        .map(|d| {
            out[d]
                .iter()
                .map(|c| match c {
                    Cell::Value { v, .. } if *v > 0.0 => Some(*v),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_else(|| vec![None; figures.len()]);
    for row in &mut out {
        for (cell, d) in row.iter_mut().zip(&direct) {
            if let (Cell::Value { v, ratio }, Some(d)) = (cell, d) {
                *ratio = Some(*v / d);
            }
        }
    }
    out
}

/// A number with a precision that suits its size; thousands grouped.
pub fn number(v: f64) -> String {
    if !v.is_finite() {
        return "nan".into();
    }
    if v < 0.0 {
        return format!("-{}", number(-v));
    }
    if v >= 1000.0 {
        group(v.round() as u64)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// 12345 -> "12,345".
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn cell_text(c: &Cell) -> String {
    match c {
        Cell::Value { v, ratio: Some(r) } => format!("{} ({r:.2}×)", number(*v)),
        Cell::Value { v, ratio: None } => number(*v),
        Cell::NotApplicable => "n/a".into(),
        Cell::Capped(n) => format!("✗ max {}", group(*n as u64)),
        Cell::Skipped => "skipped".into(),
        Cell::NotRun => "not run".into(),
        Cell::Error => "error".into(),
    }
}

/// The markdown table.
pub fn table(figures: &[Figure], rows: &[Row], cells: &[Vec<Cell>]) -> String {
    let mut t = String::from("| contender |");
    for f in figures {
        let _ = write!(t, " {} |", f.title);
    }
    t.push_str("\n|---|");
    for _ in figures {
        t.push_str("---:|");
    }
    t.push('\n');
    for (row, cells) in rows.iter().zip(cells) {
        let _ = write!(t, "| {} |", row.contender.name());
        for c in cells {
            let _ = write!(t, " {} |", cell_text(c));
        }
        t.push('\n');
    }
    t
}

/// Parses the first table of `md` (the one starting `| contender |`) and checks it: a row for
/// each contender, every row with every column, every cell a number with its ratio to direct
/// (or without, where direct has none), `n/a` (direct's daemon figures only), `✗ max N` (a
/// connection count the contender could not get past), `not run` (a case the run left out) or,
/// for a whole row, `skipped`.
/// Returns the number of columns.
pub fn validate(md: &str) -> Result<usize> {
    validate_rows(md, &Contender::ALL)
}

/// As [`validate`], for a report whose rows are `contenders` (a run with `--contender`).
pub fn validate_rows(md: &str, contenders: &[Contender]) -> Result<usize> {
    let lines: Vec<&str> = md.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("| contender |"))
        .context("no table starting with `| contender |`")?;
    let split = |l: &str| -> Vec<String> {
        let l = l.trim();
        let inner = l.strip_prefix('|').unwrap_or(l);
        let inner = inner.strip_suffix('|').unwrap_or(inner);
        inner.split('|').map(|c| c.trim().to_string()).collect()
    };
    let header = split(lines[start]);
    let columns = header.len();
    ensure!(columns >= 2, "the header has no figure columns");
    ensure!(
        header.iter().all(|h| !h.is_empty()),
        "an empty header cell: {header:?}"
    );
    let sep = split(lines.get(start + 1).context("no separator line")?);
    ensure!(
        sep.len() == columns && sep.iter().all(|c| c.trim_matches(':').starts_with("---")),
        "the separator line does not have {columns} columns"
    );
    let mut seen = Vec::new();
    for (n, line) in lines[start + 2..]
        .iter()
        .take_while(|l| l.starts_with('|'))
        .enumerate()
    {
        let row = split(line);
        let name = row[0].clone();
        ensure!(
            row.len() == columns,
            "row {} ({name}) has {} columns, the header {columns}",
            n + 1,
            row.len()
        );
        let is_direct = name == Contender::Direct.name();
        let skipped = row[1..].iter().all(|c| c == "skipped");
        for (cell, head) in row[1..].iter().zip(&header[1..]) {
            check_cell(cell, head, is_direct, skipped)
                .with_context(|| format!("row {name}, column {head:?}: {cell:?}"))?;
        }
        seen.push(name);
    }
    for c in contenders {
        ensure!(
            seen.iter().any(|s| s == c.name()),
            "no row for {}; rows: {seen:?}",
            c.name()
        );
    }
    ensure!(
        seen.len() == contenders.len(),
        "{} rows, expected {}",
        seen.len(),
        contenders.len()
    );
    Ok(columns)
}

/// `head`: the column's header; a kernel memory growth may come out below zero in noise.
fn check_cell(cell: &str, head: &str, is_direct: bool, row_skipped: bool) -> Result<()> {
    let signed = head.starts_with("kernel");
    if row_skipped || cell == "not run" {
        return Ok(());
    }
    if cell == "n/a" {
        ensure!(is_direct, "n/a outside the direct row");
        return Ok(());
    }
    if let Some(n) = cell.strip_prefix("✗ max ") {
        parse_number(n, false)?;
        return Ok(());
    }
    let (value, ratio) = match cell.split_once(" (") {
        Some((v, r)) => (v, Some(r)),
        None => (cell, None),
    };
    let v = parse_number(value, signed)?;
    match ratio {
        Some(r) => {
            let r = r
                .strip_suffix("×)")
                .context("the ratio does not end in `×)`")?;
            let r: f64 = r.parse().with_context(|| format!("bad ratio {r:?}"))?;
            ensure!(r.is_finite() && (signed || r >= 0.0), "bad ratio {r}");
            if is_direct {
                ensure!((r - 1.0).abs() < 0.005, "direct's ratio to itself is {r}");
            }
        }
        // Ratios are taken to a direct figure above zero only; a kernel memory growth can
        // come out at or below zero in noise (seen: -13.7 MiB), and then has none.
        None => ensure!(
            !is_direct || v <= 0.0,
            "a direct value without its ratio (1.00×) to itself"
        ),
    }
    Ok(())
}

fn parse_number(s: &str, signed: bool) -> Result<f64> {
    let v: f64 = s
        .replace(',', "")
        .parse()
        .with_context(|| format!("not a number: {s:?}"))?;
    if !v.is_finite() || (v < 0.0 && !signed) {
        bail!("not a finite non-negative number: {s:?}");
    }
    Ok(v)
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock.
pub fn today() -> String {
    date_of(std::time::SystemTime::now())
}

/// `at`'s date (UTC) as YYYY-MM-DD (a time before 1970 as 1970-01-01: humantime panics on it).
fn date_of(at: std::time::SystemTime) -> String {
    let mut text = humantime::format_rfc3339_seconds(at.max(std::time::UNIX_EPOCH)).to_string();
    text.truncate("YYYY-MM-DD".len());
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures() -> Vec<Figure> {
        vec![
            Figure {
                title: "upload Gbit/s".into(),
                higher_better: true,
                daemon_only: false,
                measured: true,
            },
            Figure {
                title: "daemon CPU s/GB".into(),
                higher_better: false,
                daemon_only: true,
                measured: true,
            },
        ]
    }

    fn rows() -> Vec<Row> {
        Contender::ALL
            .iter()
            .enumerate()
            .map(|(i, &c)| Row {
                contender: c,
                skipped: None,
                samples: vec![
                    vec![
                        Sample::Value(10.0 + i as f64),
                        Sample::Value(20.0),
                        Sample::Failed,
                    ],
                    if i == 4 {
                        vec![Sample::Capped(3000), Sample::Capped(3100)]
                    } else {
                        vec![Sample::Value(0.5)]
                    },
                ],
            })
            .collect()
    }

    #[test]
    fn medians_ratios_and_a_table_that_validates() {
        let (f, r) = (figures(), rows());
        let c = cells(&f, &r);
        assert_eq!(
            c[0][0],
            Cell::Value {
                v: 15.0,
                ratio: Some(1.0)
            }
        );
        assert_eq!(c[0][1], Cell::NotApplicable);
        assert_eq!(c[4][1], Cell::Capped(3050));
        let t = table(&f, &r, &c);
        assert!(t.contains("| direct | 15.0 (1.00×) | n/a |"), "{t}");
        assert_eq!(validate(&t).unwrap(), 3);
        // A case the run left out (`--no-bulk`): every row says so, and the table validates.
        let mut left_out = figures();
        left_out[0].measured = false;
        let c = cells(&left_out, &r);
        assert!(c.iter().all(|row| row[0] == Cell::NotRun));
        let t = table(&left_out, &r, &c);
        assert!(t.contains("| direct | not run | n/a |"), "{t}");
        assert_eq!(validate(&t).unwrap(), 3);
    }

    #[test]
    fn malformed_tables_are_rejected() {
        let (f, r) = (figures(), rows());
        let t = table(&f, &r, &cells(&f, &r));
        let missing_cell = t.replacen("| n/a |", "|", 1);
        assert!(validate(&missing_cell).is_err());
        let missing_row: String = t
            .lines()
            .filter(|l| !l.starts_with("| socat"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(validate(&missing_row).is_err());
        // A run of some contenders (`--contender`) is checked against those.
        let some: Vec<Contender> = Contender::ALL
            .into_iter()
            .filter(|&c| c != Contender::Socat)
            .collect();
        assert_eq!(validate_rows(&missing_row, &some).unwrap(), 3);
        assert!(validate_rows(&t, &some).is_err());
        assert!(validate(&t.replacen("0.500", "error", 1)).is_err());
        assert!(validate(&t.replacen("0.500", "", 1)).is_err());
        assert!(validate("no table").is_err());
        let kernel = "kernel MiB @500 idle";
        assert!(check_cell("-13.7", kernel, true, false).is_ok());
        assert!(check_cell("2.56", kernel, true, false).is_err());
        assert!(check_cell("15.0", "upload Gbit/s", true, false).is_err());
    }

    #[test]
    fn numbers_and_dates() {
        assert_eq!(number(12345.4), "12,345");
        assert_eq!(number(123.4), "123");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(1.234), "1.23");
        assert_eq!(number(0.1234), "0.123");
        let day = |days: u64| {
            date_of(std::time::UNIX_EPOCH + std::time::Duration::from_secs(days * 86_400))
        };
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(19_723), "2024-01-01");
        assert_eq!(day(19_782), "2024-02-29");
        assert_eq!(today().len(), "YYYY-MM-DD".len());
    }
}
