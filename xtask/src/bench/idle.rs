//! The idle-connection ramp of a round: connections held open through the contender, level by
//! level, with set-up probes and memory read where the plan says.
use std::time::Duration;

use anyhow::Result;

use super::{
    client,
    contenders::{Contender, Instance},
    notes::Notes,
    plan::Plan,
    report::{self, Sample},
    sys,
    topology::{check_stop, sleep},
};

/// Ramps idle connections through the levels, probing set-up time and reading memory where the
/// plan says. A contender that cannot get past a count is `Capped` there for the levels above.
pub fn idle_and_setup(
    inst: &mut Instance,
    plan: &Plan,
    samples: &mut [Vec<Sample>],
    round: usize,
    c: Contender,
    notes: &mut Notes,
) -> Result<()> {
    let kernel0 = sys::kernel_memory_bytes()?;
    let mut conns = Vec::new();
    let mut capped = None;
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let mut result = Ok(());
    let has_daemon = inst.pid().is_some();
    for level in &plan.levels {
        if capped.is_none() {
            check_stop()?;
            if let Err(why) =
                client::open_idle(inst.target(), &mut conns, level.count, plan.open_threads)
            {
                check_stop()?;
                let n = conns.len();
                notes.cap(c, round, n, level.count, format!("{why:#}"));
                capped = Some(n);
            }
        }
        if let Some(n) = capped {
            if let Some(fig) = level.setup_fig {
                samples[fig].push(Sample::Capped(n));
            }
            if let Some((daemon, kernel)) = level.memory_figs {
                if has_daemon {
                    samples[daemon].push(Sample::Capped(n));
                }
                samples[kernel].push(Sample::Capped(n));
            }
            continue;
        }
        if let Some((daemon, kernel)) = level.memory_figs {
            sleep(Duration::from_millis(500))?;
            inst.check_alive()?;
            if let Some(pid) = inst.pid() {
                samples[daemon].push(Sample::Value(mib(sys::tree_pss_bytes(pid) as f64)));
            }
            let kernel1 = sys::kernel_memory_bytes()?;
            samples[kernel].push(Sample::Value(mib(kernel1 as f64 - kernel0 as f64)));
        }
        if let Some(fig) = level.setup_fig {
            match client::setup_probes(inst.target(), plan.probes) {
                Ok(p50) => samples[fig].push(Sample::Value(p50)),
                Err(e) => {
                    check_stop()?;
                    samples[fig].push(Sample::Failed);
                    result = Err(
                        e.context(format!("set-up probes at {} live connections", level.count))
                    );
                    break;
                }
            }
        }
    }
    let open = conns.len();
    let failed = client::quit_all(conns);
    if failed > 0 {
        notes.broke(
            c,
            format!(
            "{}, round {round}: closing the idle connections (QUIT, the upstream closes first), \
             {failed} of {} did not end cleanly: a reset, or no EOF within 3 s",
            c.name(),
            report::group(open as u64)
        ),
        );
    }
    result
}
