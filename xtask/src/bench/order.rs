//! The order contenders take their turns in: a permutation per turn (a round, or a round's
//! round-trip connection), so that none always follows the same one.

/// The order of `n` contenders in round `round` (from 1; or any count of turns from 1, as the
/// round trips' connections use it): every k-th one of the table, k the
/// round's own stride prime to `n` (1, 2, 3, … for 11 contenders), rotated to start `round - 1`
/// further; round 1 is the table's order. A rotation alone would keep every contender's
/// predecessor, and a predecessor leaves its TIME_WAIT sockets, page cache and kernel threads'
/// state to the next; a stride alone would keep the first and last.
pub fn round_order(n: usize, round: usize) -> Vec<usize> {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let stride = (1..=n.max(1))
        .filter(|&s| gcd(s, n) == 1)
        .cycle()
        .nth(round - 1)
        .unwrap_or(1);
    let mut order: Vec<usize> = (0..n).map(|i| i * stride % n).collect();
    order.rotate_left((round - 1) % n.max(1));
    order
}

#[cfg(test)]
mod tests {
    use super::round_order;

    #[test]
    fn every_round_is_a_permutation_and_predecessors_change() {
        assert_eq!(round_order(11, 1), (0..11).collect::<Vec<_>>());
        for n in [1, 2, 8, 11, 12] {
            for round in 1..=20 {
                let mut order = round_order(n, round);
                order.sort_unstable();
                assert_eq!(order, (0..n).collect::<Vec<_>>(), "n {n} round {round}");
            }
        }
        // Who runs just before contender 1 (auto) in rounds 1-5 of 11 contenders.
        let before = |round| {
            let order = round_order(11, round);
            let at = order.iter().position(|&i| i == 1).unwrap();
            (at > 0).then(|| order[at - 1])
        };
        let mut seen: Vec<Option<usize>> = (1..=5).map(before).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 5, "{seen:?}");
        let mut last: Vec<usize> = (1..=5).map(|r| round_order(11, r)[10]).collect();
        last.sort_unstable();
        last.dedup();
        assert_eq!(last.len(), 5, "{last:?}");
    }
}
