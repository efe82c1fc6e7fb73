//! The SNI route's cost: `spliced auto (SNI route)` against `spliced auto`, from the table.
use super::{
    contenders::Contender,
    report::{self, Figure, Row},
};

/// The SNI route against the plain one, from the table's medians: the set-up time each way
/// and the ratios of the other figures issue 12 asks about.
pub fn note(figures: &[Figure], rows: &[Row], cells: &[Vec<report::Cell>]) -> Option<String> {
    let find = |c| rows.iter().position(|r: &Row| r.contender == c);
    let (plain, sni) = (find(Contender::Auto)?, find(Contender::AutoSni)?);
    let mut parts = Vec::new();
    for (i, f) in figures.iter().enumerate() {
        let (report::Cell::Value { v: x, .. }, report::Cell::Value { v: y, .. }) =
            (&cells[plain][i], &cells[sni][i])
        else {
            continue;
        };
        if f.title.starts_with("set-up") {
            parts.push(format!(
                "{} {} against {} ({:+.0} µs per connection)",
                f.title,
                report::number(*y),
                report::number(*x),
                y - x
            ));
        } else if ["upload", "download", "short conn/s", "all tasks"]
            .iter()
            .any(|p| f.title.starts_with(p))
            && *x > 0.0
        {
            parts.push(format!("{} {:.2}×", f.title, y / x));
        }
    }
    (!parts.is_empty()).then(|| {
        format!(
            "SNI route against plain route (`spliced auto (SNI route)` against `spliced auto`, \
             medians of this run): {}. After the routing decision both run the same data path; \
             the set-up difference is the peek (the ClientHello read and parsed) before the \
             dial, and its bytes written to the upstream first.",
            parts.join("; ")
        )
    })
}
