//! One contender's round: upload and download through one instance, then on a fresh one the
//! small-message cases (idle connections and set-up, short connections). The round trips are
//! the round's own case, every contender's in turn (`round_trips`).
use std::time::Instant;

use anyhow::{Context as _, Result};

use super::{
    bulk,
    client::{self, Closer},
    contenders::{self, Contender, Env, Instance},
    idle::idle_and_setup,
    notes::{short_error, Notes},
    plan::{
        small_port, Plan, ALL_CPU_CONN, ALL_CPU_DOWN, ALL_CPU_UP, DAEMON_CPU, DOWN, IPERF_PORT,
        SHORT, SHORT_CLIENT_CLOSES, UP,
    },
    report::Sample,
    shorts::{self, TimeWait},
    topology::check_stop,
};

/// Upload, download and their CPU cost through a fresh instance.
pub fn bulk_round(
    c: Contender,
    env: &Env,
    plan: &Plan,
    round: usize,
    samples: &mut [Vec<Sample>],
) -> Result<()> {
    let mut inst = contenders::start(c, env, IPERF_PORT, &format!("r{round}-bulk"))?;
    let tag = format!("{}-r{round}", c.slug());
    let b = bulk::measure(
        &mut inst,
        &plan.iperf_amount,
        &env.guard.dir,
        &tag,
        plan.perf(round),
    )
    .with_context(|| contenders::log_tail(inst.log.as_deref()))?;
    samples[UP].push(Sample::Value(b.up_gbps));
    samples[DOWN].push(Sample::Value(b.down_gbps));
    if let Some(cpu) = b.daemon_cpu_per_gb {
        samples[DAEMON_CPU].push(Sample::Value(cpu));
    }
    samples[ALL_CPU_UP].push(Sample::Value(b.all_cpu_per_gb[0]));
    samples[ALL_CPU_DOWN].push(Sample::Value(b.all_cpu_per_gb[1]));
    Ok(())
}

/// On a fresh instance in front of the echo server: idle connections and set-up probes, round
/// trips, short connections. A failure fails its figures for this round, noted; Ctrl-C fails
/// the whole bench.
pub fn small_round(
    c: Contender,
    env: &Env,
    plan: &Plan,
    tag: &str,
    round: usize,
    samples: &mut [Vec<Sample>],
    notes: &mut Notes,
) -> Result<()> {
    let Some(mut inst) = start_small(c, env, &format!("{tag}-small"), round, notes)? else {
        return Ok(());
    };
    let t_idle = Instant::now();
    if let Err(e) = idle_and_setup(&mut inst, plan, samples, round, c, notes) {
        check_stop()?;
        let e = e.context(contenders::log_tail(inst.log.as_deref()));
        note(notes, c, round, "idle connections", &e);
    }
    let t_short = Instant::now();
    let tw_before = upstream_closes(c, &inst, plan, round, samples, notes)?;
    let t_close = Instant::now();
    client_closes(c, &inst, plan, round, tw_before, samples, notes)?;
    if let Err(e) = inst.check_alive() {
        note(notes, c, round, "end of round", &e);
    }
    let t_end = Instant::now();
    drop(inst);
    eprintln!(
        "bench: round {round}: {}: idle+set-up {:.1} s, short {:.1} s, client closes first \
         {:.1} s, stop {:.1} s",
        c.name(),
        (t_short - t_idle).as_secs_f64(),
        (t_close - t_short).as_secs_f64(),
        (t_end - t_close).as_secs_f64(),
        t_end.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A remark that `c`'s `what` failed in `round`.
pub fn note(notes: &mut Notes, c: Contender, round: usize, what: &str, e: &anyhow::Error) {
    notes.push(format!(
        "{}, round {round}, {what}: {}",
        c.name(),
        short_error(e)
    ));
}

/// A small-message instance of `c` for `round`, in front of its own upstream port
/// ([`small_port`]), warmed up, its files named by `tag`; `None` (noted) if it does not start.
pub fn start_small(
    c: Contender,
    env: &Env,
    tag: &str,
    round: usize,
    notes: &mut Notes,
) -> Result<Option<Instance>> {
    let port = small_port(round, c);
    match contenders::start(c, env, port, tag).and_then(|inst| {
        // Warm-up: systemd-socket-activate execs proxyd at the first connection.
        client::quit(client::greet(inst.target())?.0)?;
        Ok(inst)
    }) {
        Ok(inst) => Ok(Some(inst)),
        Err(e) => {
            check_stop()?;
            note(notes, c, round, "start", &e);
            Ok(None)
        }
    }
}

/// Short connections that the upstream closes first, and the CPU they cost; returns the
/// TIME_WAIT count toward the instance's ports after them (before them, if they failed).
fn upstream_closes(
    c: Contender,
    inst: &Instance,
    plan: &Plan,
    round: usize,
    samples: &mut [Vec<Sample>],
    notes: &mut Notes,
) -> Result<TimeWait> {
    let port = small_port(round, c);
    let tw0 = TimeWait::count(inst, port);
    let mut tw_before = tw0;
    let name = format!("{}-r{round}-short", c.slug());
    let case = shorts::run(
        inst,
        port,
        Closer::Upstream,
        plan.short,
        plan.perf(round),
        &name,
    )?;
    eprintln!(
        "bench: round {round}: {}: short connections {:.2} s, TIME_WAIT count {:.2} s",
        c.name(),
        case.took[0].as_secs_f64(),
        case.took[1].as_secs_f64()
    );
    match case.shorts {
        Ok(shorts) => {
            samples[SHORT].push(Sample::Value(shorts.per_sec));
            if let Some(us) = case.cpu_us_per_conn {
                samples[ALL_CPU_CONN].push(Sample::Value(us));
            }
            notes
                .time_wait
                .push((Closer::Upstream, c, case.time_wait.since(tw0)));
            tw_before = case.time_wait;
            broke_some(notes, c, round, "short connections", &shorts);
        }
        Err(e) => {
            check_stop()?;
            let line = format!("{}, round {round}, short connections: {e:#}", c.name());
            notes.broke(c, line);
        }
    }
    Ok(tw_before)
}

/// Notes the connections of a short-connection run that failed; spliced's fail the bench.
fn broke_some(notes: &mut Notes, c: Contender, round: usize, what: &str, s: &client::Shorts) {
    if s.failed > 0 {
        notes.broke(
            c,
            format!(
                "{}, round {round}, {what}: {} of {} failed (each stalls its client thread up \
                 to 3 s); first: {}",
                c.name(),
                s.failed,
                s.done + s.failed,
                s.first_error.as_deref().unwrap_or_default()
            ),
        );
    }
}

/// Short connections that the client closes first: the last case of the round, on the small
/// instance, whose upstream port ([`small_port`]) no other contender or round dials, so neither
/// this case nor any other meets the TIME_WAIT of another. `before`: the TIME_WAIT the earlier
/// cases left toward the instance's ports.
fn client_closes(
    c: Contender,
    inst: &Instance,
    plan: &Plan,
    round: usize,
    before: TimeWait,
    samples: &mut [Vec<Sample>],
    notes: &mut Notes,
) -> Result<()> {
    let what = "short connections, client closes first";
    let name = format!("{}-r{round}-client-closes", c.slug());
    let case = shorts::run(
        inst,
        small_port(round, c),
        Closer::Client,
        plan.client_closes,
        plan.perf(round),
        &name,
    )?;
    match case.shorts {
        Ok(shorts) => {
            samples[SHORT_CLIENT_CLOSES].push(Sample::Value(shorts.per_sec));
            let tw = case.time_wait.since(before);
            notes.time_wait.push((Closer::Client, c, tw));
            broke_some(notes, c, round, what, &shorts);
        }
        Err(e) => {
            check_stop()?;
            notes.broke(c, format!("{}, round {round}, {what}: {e:#}", c.name()));
        }
    }
    Ok(())
}
