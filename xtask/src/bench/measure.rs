//! The run: the servers in the namespace, each contender checked once, then the rounds, the
//! contenders interleaved round by round (and connection by connection for the round trips).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    client::{self, Target},
    contenders::{self, Contender, Env, ProxydForm},
    notes::{short_error, Notes},
    order::round_order,
    plan::{small_port, Plan, ECHO_PORT, IPERF_PORT},
    report::{Figure, Row},
    round::{bulk_round, small_round},
    round_trips,
    topology::{check_stop, Guard, Proc},
};

/// The rows, and how each contender was run.
pub type Measured = (Vec<Row>, Vec<(Contender, String)>);

/// Starts the servers in the namespace, checks each contender once, runs the rounds.
pub fn measure(
    guard: &mut Guard,
    spliced: &Path,
    plan: &Plan,
    figures: &[Figure],
    notes: &mut Notes,
) -> Result<Measured> {
    let ifindex = guard.ifindex()?;
    start_servers(guard, plan)?;
    let proxyd = proxyd_path();
    let guard: &Guard = guard;
    let mut env = Env {
        guard,
        spliced,
        ifindex,
        proxyd: &proxyd,
        proxyd_form: ProxydForm::Bracketed,
    };
    client::quit(client::greet(Target::plain(env.upstream_addr(ECHO_PORT)))?.0)
        .context("the echo server does not answer at fe80::2")?;

    let mut rows = preflight_all(&mut env, &plan.contenders, figures, notes)?;
    for round in 1..=plan.rounds {
        run_round(&env, plan, round, &mut rows, notes)?;
    }
    let descriptions = plan
        .contenders
        .iter()
        .map(|&c| (c, contenders::describe(c, env.proxyd_form)))
        .collect();
    Ok((rows, descriptions))
}

/// The iperf3 server and the echo server (on [`ECHO_PORT`] and each contender's and round's
/// port after it) in the namespace; returns once all of them listen.
fn start_servers(guard: &mut Guard, plan: &Plan) -> Result<()> {
    let log = |name: &str| -> Result<(fs::File, fs::File)> {
        let f = fs::File::create(guard.dir.join(name))?;
        Ok((f.try_clone()?, f))
    };
    let (out, err) = log("iperf3-server.log")?;
    let mut iperf = guard.exec_in_ns("iperf3");
    iperf
        .args(["-s", "-p", &IPERF_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let iperf = Proc::spawn("the iperf3 server", &mut iperf)?;
    let iperf_pid = iperf.pid();
    guard.procs.push(iperf);
    let exe = std::env::current_exe().context("cannot find the xtask binary")?;
    let (out, err) = log("echo-server.log")?;
    let mut echo = guard.exec_in_ns(&exe);
    let last = small_port(plan.rounds, Contender::ALL[Contender::ALL.len() - 1]);
    echo.args(["bench", "--serve", &ECHO_PORT.to_string()])
        .args(["--serve-last", &last.to_string()])
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(err);
    let echo = Proc::spawn("the echo server", &mut echo)?;
    let echo_pid = echo.pid();
    guard.procs.push(echo);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(contenders::listening(Some(iperf_pid), IPERF_PORT)
        && contenders::listening(Some(echo_pid), ECHO_PORT)
        && contenders::listening(Some(echo_pid), last))
    {
        check_stop()?;
        for p in &mut guard.procs {
            p.check_alive()?;
        }
        if Instant::now() > deadline {
            bail!("the servers in the namespace do not listen after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// systemd-socket-proxyd: in /lib/systemd or /usr/lib/systemd, whichever this system has.
fn proxyd_path() -> PathBuf {
    [
        "/lib/systemd/systemd-socket-proxyd",
        "/usr/lib/systemd/systemd-socket-proxyd",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("/lib/systemd/systemd-socket-proxyd"))
}

/// A row per contender, each checked once with [`preflight`]; one that fails is skipped, noted.
fn preflight_all(
    env: &mut Env,
    contenders: &[Contender],
    figures: &[Figure],
    notes: &mut Notes,
) -> Result<Vec<Row>> {
    let mut rows: Vec<Row> = contenders
        .iter()
        .map(|&c| Row {
            contender: c,
            skipped: None,
            samples: vec![Vec::new(); figures.len()],
        })
        .collect();
    for row in &mut rows {
        if let Err(e) = preflight(row.contender, env, notes) {
            check_stop()?;
            let why = format!("{e:#}");
            notes.push(format!("{} skipped: {why}", row.contender.name()));
            row.skipped = Some(why);
        }
    }
    Ok(rows)
}

/// Round `round` of every contender not skipped: the round trips, every contender's in turn
/// ([`round_trips`]); then each contender's other cases, in [`round_order`].
fn run_round(
    env: &Env,
    plan: &Plan,
    round: usize,
    rows: &mut [Row],
    notes: &mut Notes,
) -> Result<()> {
    round_trips::run(env, plan, round, rows, notes)?;
    let mut live: Vec<Option<&mut Row>> = rows
        .iter_mut()
        .filter(|r| r.skipped.is_none())
        .map(Some)
        .collect();
    let order = round_order(live.len(), round);
    for row in order.into_iter().filter_map(|i| live[i].take()) {
        let c = row.contender;
        let t0 = Instant::now();
        let tag = format!("r{round}");
        if plan.bulk {
            if let Err(e) = bulk_round(c, env, plan, round, &mut row.samples) {
                check_stop()?;
                notes.push(format!(
                    "{}, round {round}, iperf3: {}",
                    c.name(),
                    short_error(&e)
                ));
            }
        }
        let t1 = Instant::now();
        small_round(c, env, plan, &tag, round, &mut row.samples, notes)?;
        eprintln!(
            "bench: round {round}/{}: {}: bulk {:.1} s, small messages {:.1} s",
            plan.rounds,
            c.name(),
            (t1 - t0).as_secs_f64(),
            t1.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Starts `c` once and passes a connection through it. systemd-socket-proxyd is tried with the
/// bracketed `[fe80::2%IF]:PORT` first, then with `fe80::2%IF:PORT`.
fn preflight(c: Contender, env: &mut Env, notes: &mut Notes) -> Result<()> {
    if c == Contender::Direct {
        return Ok(());
    }
    let attempt = |env: &Env| -> Result<()> {
        let mut inst = contenders::start(c, env, ECHO_PORT, "preflight")?;
        let r = client::greet(inst.target()).and_then(|(s, _)| client::quit(s));
        r.with_context(|| contenders::log_tail(inst.log.as_deref()))?;
        inst.check_alive()
    };
    match attempt(env) {
        Ok(()) => Ok(()),
        Err(e) if c == Contender::Proxyd => {
            check_stop()?;
            env.proxyd_form = ProxydForm::Bare;
            attempt(env).with_context(|| {
                format!(
                    "with [fe80::2%IF]:PORT: {}; with fe80::2%IF:PORT",
                    short_error(&e)
                )
            })?;
            notes.push(format!(
                "systemd-socket-proxyd does not take the bracketed `[fe80::2%IF]:PORT` \
                 ({}); it does take the zone as `fe80::2%IF:PORT` (it splits host and port at \
                 the last colon and resolves the host with getaddrinfo), which is what was \
                 measured.",
                short_error(&e)
            ));
            Ok(())
        }
        Err(e) => Err(e),
    }
}
