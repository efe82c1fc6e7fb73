//! The cost of the XDP front as one line of the notes: each figure of `spliced auto + XDP in the
//! namespace` over the same figure of `spliced auto in the namespace` (same topology, same run).
use super::{
    contenders::Contender,
    report::{Cell, Figure, Row},
};

/// "The XDP front's cost …: upload 0.98×, …", or None when either row has no figures.
pub fn note(figures: &[Figure], rows: &[Row], cells: &[Vec<Cell>]) -> Option<String> {
    let row = |c: Contender| {
        rows.iter()
            .position(|r| r.contender == c)
            .map(|i| &cells[i])
    };
    let (base, xdp) = (row(Contender::AutoNs)?, row(Contender::AutoXdp)?);
    let ratios: Vec<String> = figures
        .iter()
        .zip(base.iter().zip(xdp))
        .filter_map(|(f, pair)| match pair {
            (Cell::Value { v: b, .. }, Cell::Value { v: x, .. }) if *b > 0.0 => {
                Some(format!("{} {:.2}×", f.title, x / b))
            }
            _ => None,
        })
        .collect();
    (!ratios.is_empty()).then(|| {
        format!(
            "The XDP front's cost, as `{}` over `{}` (the same topology, this run; 1.00× is no \
             cost, higher is better for rates, lower for times, CPU and memory): {}. Generic mode, as \
             advised for a veth: in native mode a veth's peer, here the client's side, loses its \
             segmentation offload and the uploads arrive in 1,500-byte frames (docs/xdp.md, \
             \"Cost\").",
            Contender::AutoXdp.name(),
            Contender::AutoNs.name(),
            ratios.join(", ")
        )
    })
}
