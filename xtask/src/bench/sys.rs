//! What the kernel tells about a process tree's CPU time and memory (`/proc/PID/stat`,
//! `/proc/PID/smaps_rollup`), kernel memory (`/proc/meminfo`, `/proc/net/sockstat`), TIME_WAIT
//! sockets (`ss`); and the machine's description.
use std::{collections::HashMap, fs, process::Command};

use anyhow::{Context as _, Result};

use crate::util::output;

/// The commit spliced is built from (`git rev-parse --short HEAD`, `+` when the tree has
/// changes), or "unknown".
pub fn commit() -> String {
    let git = |args: &[&str]| output(Command::new("git").args(args)).unwrap_or_default();
    let head = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"])
        .trim()
        .is_empty();
    match head.trim() {
        "" => "unknown".into(),
        h => format!("{h}{}", if dirty { "+" } else { "" }),
    }
}

/// Clock ticks per second (`USER_HZ`).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The fields of `/proc/PID/stat` after the command name: index 0 is field 3 (state).
pub fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut words = rest.split_whitespace();
    let state = words.next()?;
    // The state letter becomes 0 for a zombie, 1 otherwise.
    let mut out = vec![u64::from(state != "Z")];
    out.extend(words.map(|w| w.parse::<i64>().unwrap_or(0) as u64));
    Some(out)
}

const PPID: usize = 1;
const UTIME: usize = 11;
const STARTTIME: usize = 19;

/// The pid of every process on the machine (the numeric entries of `/proc`; none if it cannot
/// be read). A process may exit before its files are read: callers skip what they cannot read.
pub fn pids() -> impl Iterator<Item = u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
}

/// Every process on the machine as pid -> (ppid, starttime).
fn process_table() -> HashMap<u32, (u32, u64)> {
    pids()
        .filter_map(|pid| {
            let f = stat_fields(pid)?;
            (f.len() > STARTTIME).then(|| (pid, (f[PPID] as u32, f[STARTTIME])))
        })
        .collect()
}

/// `root` and its descendants, with their start times.
pub fn tree(root: u32) -> Vec<(u32, u64)> {
    let table = process_table();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, &(ppid, _)) in &table {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    // Bounded: each pid is visited once (the table is a forest).
    while let Some(pid) = todo.pop() {
        if let Some(&(_, start)) = table.get(&pid) {
            out.push((pid, start));
        }
        if out.len() > table.len() {
            break;
        }
        if let Some(kids) = children.get(&pid) {
            todo.extend(kids);
        }
    }
    out
}

/// The descendants of `root` (not `root`), with their start times.
pub fn descendants(root: u32) -> Vec<(u32, u64)> {
    tree(root).into_iter().filter(|&(p, _)| p != root).collect()
}

/// Whether `pid` is still the live process that started at `start` (not a reused pid).
pub fn is_same_live(pid: u32, start: u64) -> bool {
    stat_fields(pid).is_some_and(|f| f[0] == 1 && f.get(STARTTIME) == Some(&start))
}

/// CPU seconds of `root` and its descendants: utime+stime of each live one, and cutime+cstime
/// (the children each has reaped, so exited per-connection processes count too).
pub fn tree_cpu_seconds(root: u32) -> f64 {
    let ticks: u64 = tree(root)
        .iter()
        .filter_map(|&(pid, _)| stat_fields(pid))
        .filter(|f| f.len() > UTIME + 3)
        .map(|f| f[UTIME] + f[UTIME + 1] + f[UTIME + 2] + f[UTIME + 3])
        .sum();
    ticks as f64 / clk_tck()
}

/// Proportional set size of `root` and its descendants, in bytes. For one process this is its
/// RSS less the shared library pages it shares with others; summing RSS over socat's thousand
/// forks would count its shared pages a thousand times.
pub fn tree_pss_bytes(root: u32) -> u64 {
    tree(root)
        .iter()
        .filter_map(|&(pid, _)| fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|text| kib_field(&text, "Pss:"))
        .sum::<u64>()
        * 1024
}

/// `Key:   123 kB` -> 123.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The TIME_WAIT sockets of this network namespace with one of `ports` at either end, as (local
/// port, remote port): `ss -tan state time-wait` with the ports as its filter, which the kernel
/// applies (sock_diag), so tens of thousands of other TIME_WAIT sockets cost little; reading
/// `/proc/net/tcp6` instead takes most of a second then.
pub fn time_wait_ports(ports: &[u16]) -> Result<Vec<(u16, u16)>> {
    let filter: Vec<String> = ports
        .iter()
        .map(|p| format!("sport = :{p} or dport = :{p}"))
        .collect();
    let out = std::process::Command::new("ss")
        .args(["-H", "-t", "-a", "-n", "state", "time-wait"])
        .arg(format!("( {} )", filter.join(" or ")))
        .output()
        .context("cannot run ss (iproute2)")?;
    if !out.status.success() {
        anyhow::bail!("ss failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let port = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
    };
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // Recv-Q Send-Q Local:Port Peer:Port (no state column with a state filter).
            let w: Vec<&str> = l.split_whitespace().collect();
            let n = w.len();
            (n >= 2).then(|| Some((port(w[n - 2])?, port(w[n - 1])?)))?
        })
        .collect())
}

/// Kernel memory that connections and processes cost, in bytes: slab (socket structs, inodes,
/// pipes, skbs' heads), kernel stacks and page tables (from `/proc/meminfo`), and the pages TCP
/// has charged for socket buffers (`mem` of `/proc/net/sockstat`, global); less the slab of
/// TIME_WAIT sockets ([`time_wait_slab_bytes`]), which earlier cases leave behind and which
/// expire, 60 s later, in the middle of another contender's measurement.
pub fn kernel_memory_bytes() -> Result<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    let mut kib = 0;
    for key in ["Slab:", "KernelStack:", "PageTables:"] {
        kib += kib_field(&meminfo, key).with_context(|| format!("/proc/meminfo has no {key}"))?;
    }
    let sockstat =
        fs::read_to_string("/proc/net/sockstat").context("cannot read /proc/net/sockstat")?;
    let tcp_pages = sockstat
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter()
                .position(|&x| x == "mem")
                .and_then(|i| w.get(i + 1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Ok((kib * 1024 + tcp_pages * page).saturating_sub(time_wait_slab_bytes(page)))
}

/// The pages of the `tw_sock_TCP` and `tw_sock_TCPv6` slab caches (`/proc/slabinfo`: num_slabs
/// times pages per slab); 0 where slabinfo cannot be read.
fn time_wait_slab_bytes(page: u64) -> u64 {
    let text = fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("tw_sock_TCP"))
        .filter_map(|l| {
            // name active_objs num_objs objsize objperslab pagesperslab : tunables ... :
            // slabdata active_slabs num_slabs sharedavail
            let w: Vec<&str> = l.split_whitespace().collect();
            let per_slab: u64 = w.get(5)?.parse().ok()?;
            let at = w.iter().position(|&x| x == "slabdata")?;
            let slabs: u64 = w.get(at + 2)?.parse().ok()?;
            Some(slabs * per_slab * page)
        })
        .sum()
}

/// Kernel, CPU model, cores and memory, for the report.
pub fn machine() -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| kib_field(&m, "MemTotal:"))
        .map_or("unknown".into(), |k| {
            format!("{:.1} GiB", k as f64 / 1024.0 / 1024.0)
        });
    format!(
        "Linux {kernel} ({arch}), {model}, {cores} cores, {mem} memory",
        arch = std::env::consts::ARCH
    )
}

/// The 1-minute load average, as `/proc/loadavg` gives it.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// Raises the soft open-file limit to `want`, or as far as the hard limit allows (raising the
/// hard limit needs CAP_SYS_RESOURCE). Returns the soft limit in force; children inherit it.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with valid structs.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_max < want {
            let higher = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &higher) == 0 {
                return want;
            }
        }
        lim.rlim_cur = lim.rlim_max.min(want.max(lim.rlim_cur));
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(tree(me).iter().any(|&(p, _)| p == me));
        assert!(tree_cpu_seconds(me) >= 0.0);
        assert!(tree_pss_bytes(me) > 0);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (a, _) = l.accept().unwrap();
        let client_port = c.local_addr().unwrap().port();
        // The side that closes first keeps the TIME_WAIT.
        drop(a);
        let mut b = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &c, &mut b).unwrap(), 0);
        drop(c);
        assert!(time_wait_ports(&[port])
            .unwrap()
            .contains(&(port, client_port)));
        assert!(!time_wait_ports(&[client_port.wrapping_add(1)])
            .unwrap()
            .contains(&(port, client_port)));
        assert!(kernel_memory_bytes().unwrap() > 0);
        // This test runs as root in CI and in the bench's checks; slabinfo needs it.
        if is_root_user() {
            assert!(fs::read_to_string("/proc/slabinfo")
                .unwrap()
                .contains("tw_sock_TCP"));
        }
        let start = tree(me)[0].1;
        assert!(is_same_live(me, start));
        assert!(pids().any(|p| p == me));
        assert!(pids().any(|p| p == 1));
        assert!(!is_same_live(me, start + 1));
    }

    fn is_root_user() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn kib_fields() {
        assert_eq!(kib_field("Slab:   123 kB\nX: 1 kB\n", "Slab:"), Some(123));
        assert_eq!(kib_field("X: 1 kB\n", "Slab:"), None);
    }
}
