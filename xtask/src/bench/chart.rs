//! The SVG chart: one panel per figure, one bar per contender, its ratio to `direct`.
use std::fmt::Write as _;

use super::report::{cell_text, number, Cell, Figure, Row};

/// One colour per contender, in `Contender::ALL` order.
const COLORS: [&str; 11] = [
    "#7f7f7f", "#1f77b4", "#aec7e8", "#2ca02c", "#17becf", "#98df8a", "#8c564b", "#ff7f0e",
    "#d62728", "#9467bd", "#e377c2",
];

const W: f64 = 1000.0;
const COL_W: f64 = 490.0;
const LABEL_W: f64 = 150.0;
const BAR_MAX: f64 = 240.0;
const BAR_H: f64 = 12.0;
const ROW_H: f64 = 15.0;
const HEAD_H: f64 = 60.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Horizontal bars, one panel per figure, one bar per contender: its ratio to direct (a dashed
/// line marks 1×). Figures direct does not have (the daemon's own CPU and memory) show the
/// absolute values instead.
pub fn svg(figures: &[Figure], rows: &[Row], cells: &[Vec<Cell>], subtitle: &str) -> String {
    let panel_h = 24.0 + ROW_H * rows.len() as f64 + 14.0;
    let panel_rows = figures.len().div_ceil(2);
    let h = HEAD_H + panel_h * panel_rows as f64 + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="22" font-size="16" font-weight="bold">spliced benchmarks: each figure as a ratio to direct (no forwarder)</text>"#
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="42" font-size="11" fill="#444">{}</text>"##,
        esc(subtitle)
    );
    for (fi, f) in figures.iter().enumerate() {
        let x0 = 10.0 + (fi % 2) as f64 * COL_W;
        let y0 = HEAD_H + (fi / 2) as f64 * panel_h;
        panel(&mut s, (x0, y0), f, rows, cells.iter().map(|r| &r[fi]));
    }
    s.push_str("</svg>\n");
    s
}

/// One figure's panel at `(x0, y0)`: its title, then a bar for each row's cell.
fn panel<'a>(
    s: &mut String,
    (x0, y0): (f64, f64),
    f: &Figure,
    rows: &[Row],
    column: impl Iterator<Item = &'a Cell> + Clone,
) {
    let absolute = f.daemon_only;
    let value = |c: &Cell| match c {
        Cell::Value { v, .. } if absolute => Some(*v),
        Cell::Value { ratio, .. } => *ratio,
        _ => None,
    };
    let max = column
        .clone()
        .filter_map(value)
        .fold(if absolute { 0.0 } else { 1.0 }, f64::max)
        .max(1e-9);
    let better = if f.higher_better {
        "higher is better"
    } else {
        "lower is better"
    };
    let kind = if absolute {
        "absolute, direct has no daemon"
    } else {
        "ratio to direct"
    };
    let _ = writeln!(
        s,
        r##"<text x="{x0}" y="{}" font-weight="bold">{} <tspan font-weight="normal" fill="#555">({kind}; {better})</tspan></text>"##,
        y0 + 14.0,
        esc(&f.title)
    );
    for (ri, (row, cell)) in rows.iter().zip(column).enumerate() {
        let y = y0 + 22.0 + ri as f64 * ROW_H;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            x0 + LABEL_W - 6.0,
            y + BAR_H - 2.0,
            esc(row.contender.name())
        );
        let label = match (cell, value(cell)) {
            (Cell::Value { v, .. }, Some(_)) if absolute => number(*v),
            (_, Some(r)) => format!("{r:.2}×"),
            (c, None) => cell_text(c),
        };
        let mut text_x = x0 + LABEL_W + 4.0;
        if let Some(v) = value(cell) {
            let w = (v / max * BAR_MAX).max(1.0);
            let _ = writeln!(
                s,
                r#"<rect x="{}" y="{y}" width="{w:.1}" height="{BAR_H}" fill="{}"/>"#,
                x0 + LABEL_W,
                COLORS[ri % COLORS.len()]
            );
            text_x += w;
        }
        let _ = writeln!(
            s,
            r##"<text x="{text_x:.1}" y="{}" fill="#222">{}</text>"##,
            y + BAR_H - 2.0,
            esc(&label)
        );
    }
    if !absolute {
        let x1 = x0 + LABEL_W + BAR_MAX / max;
        let _ = writeln!(
            s,
            "<line x1=\"{x1:.1}\" y1=\"{}\" x2=\"{x1:.1}\" y2=\"{}\" stroke=\"#000\" stroke-dasharray=\"3,2\"/>",
            y0 + 19.0,
            y0 + 22.0 + ROW_H * rows.len() as f64
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{contenders::Contender, report::Sample};

    #[test]
    fn a_panel_per_figure_a_bar_per_value() {
        assert!(
            COLORS.len() >= Contender::ALL.len(),
            "a colour for every contender"
        );
        let figures = [Figure {
            title: "up <Gbit/s>".into(),
            higher_better: true,
            daemon_only: false,
            measured: true,
        }];
        let row = |contender| Row {
            contender,
            skipped: None,
            samples: vec![vec![Sample::Value(1.0)]],
        };
        let rows = [row(Contender::Direct), row(Contender::Auto)];
        let cells = vec![
            vec![Cell::Value {
                v: 10.0,
                ratio: Some(1.0),
            }],
            vec![Cell::Value {
                v: 5.0,
                ratio: Some(0.5),
            }],
        ];
        let svg = svg(&figures, &rows, &cells, "x");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("up &lt;Gbit/s&gt;"), "{svg}");
        assert_eq!(
            svg.matches("<rect ").count(),
            3,
            "the background and two bars"
        );
        assert!(svg.contains(">0.50×<"), "{svg}");
    }
}
