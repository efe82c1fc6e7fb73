//! The round-trip case of a round: every contender's instance up at once, their connections
//! taken in turns, one contender's after another's (each turn in its own order), so that what
//! the shared machine does meanwhile falls on all of them alike. Run a contender after another,
//! seconds apart, two of spliced's own paths spread 0.66-2.64x from round to round on this
//! figure, far more than the few per cent between them (docs/profiles.md, "Round trips").
//!
//! Two exceptions: `spliced auto + XDP in the namespace` is started for each of its turns and
//! stopped after it, because its generic-mode XDP program on the veth would sit in every other
//! contender's path; and in a profiled round (`--perf`) each contender's connections run in one
//! turn, under one profile.
use std::time::{Duration, Instant};

use anyhow::Result;

use super::{
    client::{RoundTripLog, RT_CONNECTIONS},
    contenders::{self, Contender, Env, Instance},
    cpu,
    notes::Notes,
    order::round_order,
    perf,
    plan::{Plan, ALL_CPU_RR, RR, RR_P50, RR_P99},
    report::{Row, Sample},
    round::{note, start_small},
    topology::check_stop,
    wakeups,
};

/// The size of a request, and of its echo.
const SIZE: usize = 64;

/// One contender's part of the case.
struct Part {
    row: usize,
    c: Contender,
    /// Its instance; between turns, none for a contender with turns of its own.
    inst: Option<Instance>,
    log: RoundTripLog,
    /// Every task's CPU over its connections, in seconds.
    cpu: f64,
    /// Cross-core wake-ups over its connections (`None`: the kernel does not show them).
    wakeups: Option<u64>,
    failed: bool,
}

/// Whether `c` is started for each of its turns and stopped after: the XDP front.
fn own_turns(c: Contender) -> bool {
    c == Contender::AutoXdp
}

/// The round trips of `round` for every row not skipped, into the rows' samples. A contender
/// that fails has no figures for the round, noted; Ctrl-C fails the bench.
pub fn run(
    env: &Env,
    plan: &Plan,
    round: usize,
    rows: &mut [Row],
    notes: &mut Notes,
) -> Result<()> {
    let t0 = Instant::now();
    let mut parts = Vec::with_capacity(rows.len());
    for (row, r) in rows.iter().enumerate().filter(|(_, r)| r.skipped.is_none()) {
        let c = r.contender;
        let inst = if own_turns(c) {
            None
        } else {
            // One that does not start is noted and takes no turns.
            let Some(inst) = start(env, round, None, c, notes)? else {
                continue;
            };
            Some(inst)
        };
        parts.push(Part {
            row,
            c,
            inst,
            log: RoundTripLog::default(),
            cpu: 0.0,
            wakeups: Some(0),
            failed: false,
        });
    }
    let turns = if plan.perf(round).is_some() {
        1
    } else {
        RT_CONNECTIONS
    };
    for turn in 0..turns {
        for i in round_order(parts.len(), (round - 1) * turns + turn + 1) {
            let p = &mut parts[i];
            take_turn(env, plan, (round, turn), p, RT_CONNECTIONS / turns, notes)?;
        }
    }
    finish(parts, round, rows, notes);
    eprintln!(
        "bench: round {round}/{}: round trips, every contender in turn {:.1} s",
        plan.rounds,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `c`'s instance for this round's round trips, or for one `turn` of them (its log a file of
/// its own); `None` (noted) if it does not start.
fn start(
    env: &Env,
    round: usize,
    turn: Option<usize>,
    c: Contender,
    notes: &mut Notes,
) -> Result<Option<Instance>> {
    let tag = match turn {
        Some(t) => format!("r{round}-t{}-round-trips", t + 1),
        None => format!("r{round}-round-trips"),
    };
    start_small(c, env, &tag, round, notes)
}

/// `p`'s turn of `round`, `n` connections, unless it failed before; its instance started
/// first and stopped after if it has turns of its own. A failure is noted and ends `p`'s part.
fn take_turn(
    env: &Env,
    plan: &Plan,
    (round, turn): (usize, usize),
    p: &mut Part,
    n: usize,
    notes: &mut Notes,
) -> Result<()> {
    if p.failed {
        return Ok(());
    }
    if p.inst.is_none() {
        p.inst = start(env, round, Some(turn), p.c, notes)?;
    }
    let Some(inst) = p.inst.as_mut() else {
        p.failed = true;
        return Ok(());
    };
    let name = format!("{}-r{round}-round-trips", p.c.slug());
    let share = plan.rr_dur / RT_CONNECTIONS as u32;
    let r = connections(
        plan.perf(round),
        &name,
        inst,
        &mut p.log,
        n,
        share,
        plan.rr_max,
    )
    .and_then(|(cpu, wakeups)| {
        p.cpu += cpu;
        p.wakeups = p.wakeups.zip(wakeups).map(|(a, b)| a + b);
        if own_turns(p.c) {
            inst.check_alive()
        } else {
            Ok(())
        }
    });
    if let Err(e) = r {
        check_stop()?;
        let e = e.context(contenders::log_tail(inst.log.as_deref()));
        note(notes, p.c, round, "round trips", &e);
        p.failed = true;
    }
    if own_turns(p.c) {
        p.inst = None;
    }
    Ok(())
}

/// `n` connections of round trips through `inst`, `share` each, one after the other, under
/// `perf` if given; returns the CPU every task used meanwhile (their set-up included), and the
/// machine's cross-core wake-ups.
fn connections(
    perf: Option<&perf::Perf>,
    name: &str,
    inst: &Instance,
    log: &mut RoundTripLog,
    n: usize,
    share: Duration,
    max: usize,
) -> Result<(f64, Option<u64>)> {
    perf::during(perf, name, inst.pid(), || {
        let all0 = cpu::snapshot();
        let ipis0 = wakeups::count();
        for _ in 0..n {
            log.connection(inst.target(), SIZE, share, max)?;
        }
        let ipis = ipis0
            .zip(wakeups::count())
            .map(|(a, b)| b.saturating_sub(a));
        Ok((all0.seconds_until(&cpu::snapshot()), ipis))
    })
}

/// Each part's figures into its row's samples, unless it failed or its instance died; then the
/// instances stop.
fn finish(parts: Vec<Part>, round: usize, rows: &mut [Row], notes: &mut Notes) {
    for mut p in parts.into_iter().filter(|p| !p.failed) {
        if let Some(Err(e)) = p.inst.as_mut().map(Instance::check_alive) {
            note(notes, p.c, round, "round trips", &e);
            continue;
        }
        let rt = p.log.summary();
        if rt.count == 0 {
            continue;
        }
        let samples = &mut rows[p.row].samples;
        samples[ALL_CPU_RR].push(Sample::Value(p.cpu * 1e6 / rt.count as f64));
        if let Some(w) = p.wakeups {
            notes.wakeups.push((p.c, w as f64 / rt.count as f64));
        }
        samples[RR].push(Sample::Value(rt.per_sec));
        samples[RR_P50].push(Sample::Value(rt.p50_us));
        samples[RR_P99].push(Sample::Value(rt.p99_us));
    }
}
