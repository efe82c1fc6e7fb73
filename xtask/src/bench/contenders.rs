//! The contenders and how each is started in front of an upstream port in the namespace.
//! Every forwarder listens on a fresh port of 127.0.0.1 and dials fe80::2 through the host side
//! of the veth pair; `direct` has no forwarder, the client dials [fe80::2%IF] itself. The two
//! `… in the namespace` rows are the XDP front where it belongs, on the interface the clients
//! arrive on: spliced runs in the upstream's namespace, clients dial [fe80::2%IF]:PORT across
//! the veth, spliced dials [::1]:PORT; one with the front on the veth's namespace end, one
//! without, so that their ratio is the front's cost within one run.
use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    client::Target,
    hello,
    topology::{check_stop, Guard, Proc},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Contender {
    Direct,
    /// spliced's default: `auto`, which starts connections on copy and moves them to sockmap.
    Auto,
    /// `auto` on a route that routes by TLS server name: its clients send a ClientHello first.
    AutoSni,
    /// `auto` run in the namespace, the clients across the veth: the baseline of `AutoXdp`.
    AutoNs,
    /// As `AutoNs`, with the XDP front on the veth's namespace end (where the clients'
    /// packets arrive) and rules that pass everything: its cost.
    AutoXdp,
    Sockmap,
    Splice,
    Copy,
    Socat,
    Haproxy,
    Proxyd,
}

/// `--contender NAME`: a contender by its [`Contender::slug`].
impl clap::ValueEnum for Contender {
    fn value_variants<'a>() -> &'a [Self] {
        &Contender::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.slug()))
    }
}

impl Contender {
    pub const ALL: [Contender; 11] = [
        Contender::Direct,
        Contender::Auto,
        Contender::AutoSni,
        Contender::AutoNs,
        Contender::AutoXdp,
        Contender::Sockmap,
        Contender::Splice,
        Contender::Copy,
        Contender::Socat,
        Contender::Haproxy,
        Contender::Proxyd,
    ];

    /// Whether this is spliced (in any mode or set-up), not another forwarder or `direct`.
    pub fn is_spliced(self) -> bool {
        matches!(
            self,
            Contender::Auto
                | Contender::AutoSni
                | Contender::AutoNs
                | Contender::AutoXdp
                | Contender::Sockmap
                | Contender::Splice
                | Contender::Copy
        )
    }

    /// The row label of the report.
    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Auto => "spliced auto",
            Contender::AutoSni => "spliced auto (SNI route)",
            Contender::AutoNs => "spliced auto in the namespace",
            Contender::AutoXdp => "spliced auto + XDP in the namespace",
            Contender::Sockmap => "spliced sockmap",
            Contender::Splice => "spliced splice",
            Contender::Copy => "spliced copy",
            Contender::Socat => "socat",
            Contender::Haproxy => "HAProxy",
            Contender::Proxyd => "systemd-socket-proxyd",
        }
    }

    /// Whether every run has this row, `--contender` or not: the baseline and spliced's default.
    pub fn always_runs(self) -> bool {
        matches!(self, Contender::Direct | Contender::Auto)
    }

    /// A file-name-safe short name; also what `--contender` takes.
    pub fn slug(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Auto => "auto",
            Contender::AutoSni => "auto-sni",
            Contender::AutoNs => "auto-ns",
            Contender::AutoXdp => "auto-xdp",
            Contender::Sockmap => "sockmap",
            Contender::Splice => "splice",
            Contender::Copy => "copy",
            Contender::Socat => "socat",
            Contender::Haproxy => "haproxy",
            Contender::Proxyd => "proxyd",
        }
    }
}

/// How systemd-socket-proxyd is given the link-local upstream (found by the preflight).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxydForm {
    /// `[fe80::2%IF]:PORT`, as the other tools take it.
    Bracketed,
    /// `fe80::2%IF:PORT`: proxyd splits host and port at the last colon.
    Bare,
}

/// What starting a contender needs.
pub struct Env<'a> {
    pub guard: &'a Guard,
    pub spliced: &'a Path,
    pub ifindex: u32,
    pub proxyd: &'a Path,
    pub proxyd_form: ProxydForm,
}

impl Env<'_> {
    /// fe80::2 with the veth's zone: what `direct` dials.
    pub fn upstream_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2),
            port,
            0,
            self.ifindex,
        ))
    }
}

/// One running contender in front of one upstream port.
pub struct Instance {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The forwarder (none for `direct`).
    pub proc: Option<Proc>,
    /// Its log (stdout and stderr).
    pub log: Option<PathBuf>,
    /// What its clients send first (the SNI route's ClientHello), or nothing.
    pub hello: &'static [u8],
}

impl Instance {
    /// Where and how clients connect.
    pub fn target(&self) -> Target {
        Target {
            addr: self.addr,
            hello: self.hello,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Fails, with the end of the log, if the forwarder has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        let Some(proc) = self.proc.as_mut() else {
            return Ok(());
        };
        proc.check_alive()
            .with_context(|| log_tail(self.log.as_deref()))
    }
}

/// The exact command or configuration of each forwarder, for the report.
pub fn describe(c: Contender, form: ProxydForm) -> String {
    match c {
        Contender::Direct => "no forwarder: the client dials `[fe80::2%IF]:PORT` itself".into(),
        Contender::Auto | Contender::Sockmap | Contender::Splice | Contender::Copy => format!(
            "`spliced --config FILE` with `mode = \"{}\"`, `grace_period = \"0s\"`, \
             `max_connections = 100000`, a `control_socket` of its own, one route \
             `listen = \"127.0.0.1:PORT\"`, `upstream = \"[fe80::2%IF]:PORT\"`; other settings \
             default (log level info, to a file)",
            c.slug()
        ),
        Contender::AutoSni => format!(
            "as `spliced auto`, but the route has no `upstream`; it has `[[route.match]] sni = \
             [\"{sni}\"]` and `[[route.match]] protocol = \"other\"`, both with \
             `upstream = \"[fe80::2%IF]:PORT\"`. Its small-message clients send a TLS \
             ClientHello for `{sni}` (one {len}-byte record, TLS 1.3-like, padded; no handshake \
             follows, the upstream drops it) first on every connection, so they take the `sni` \
             match; iperf3's connections (a cookie first: not TLS, not HTTP) take the `other` \
             match. Both go through the peek and the routing decision, then the same data paths",
            sni = hello::SNI,
            len = hello::client_hello().len()
        ),
        Contender::AutoNs => "as `spliced auto`, but spliced runs in the upstream's namespace \
             (`ip netns exec`): `listen = \"[::]:PORT\"`, `upstream = \"[::1]:PORT\"`; the client \
             on the host dials `[fe80::2%IF]:PORT` across the veth. The same topology as the \
             next row, without the XDP front"
            .into(),
        Contender::AutoXdp => "as `spliced auto in the namespace`, plus `xdp = [\"IFp\"]` and \
             `xdp_mode = \"generic\"`: the XDP front on the namespace's end of the veth, the \
             interface the clients' packets arrive on (each is parsed and looked up; multi-buffer \
             program where the kernel has it; generic mode, which docs/xdp.md advises for a veth: \
             native XDP on a veth turns off its peer's segmentation offload), and, on the route, \
             `allow = [\"0.0.0.0/0\", \"::/0\"]`, `syn_rate = 1000000` (rules that pass \
             everything, checked at accept too). Its ratio to the row above is the cost of the \
             front (see the notes)"
            .into(),
        Contender::Socat => "`socat TCP-LISTEN:PORT,bind=127.0.0.1,fork,reuseaddr,backlog=4096 \
             TCP6:[fe80::2%IF]:PORT` (bind and backlog added: loopback only, and socat's default \
             backlog of 5 drops SYNs under concurrent connects)"
            .into(),
        Contender::Haproxy => "HAProxy `mode tcp`, `option splice-request` and \
             `option splice-response` (splicing forced both ways), `server s1 fe80::2:PORT source \
             [::]:0 interface IF`: HAProxy cannot take a zone in a server address, so the \
             interface is given with `source ... interface` (SO_BINDTODEVICE), as its users do; \
             the brief's `source ::` is rejected by HAProxy 2.6's parser (\"invalid address\"), \
             `[::]:0` is the same wildcard. Global `maxconn` left to HAProxy (derived from the \
             open-file limit), frontend `maxconn 100000`, timeouts 10 min, no logging"
            .into(),
        Contender::Proxyd => format!(
            "`systemd-socket-activate -l 127.0.0.1:PORT /lib/systemd/systemd-socket-proxyd \
             --connections-max=100000 {}` (connections-max raised from its default of 256)",
            match form {
                ProxydForm::Bracketed => "[fe80::2%IF]:PORT",
                ProxydForm::Bare => "fe80::2%IF:PORT",
            }
        ),
    }
}

/// Starts `c` in front of upstream port `up`; returns once it listens. `tag` names its files.
pub fn start(c: Contender, env: &Env, up: u16, tag: &str) -> Result<Instance> {
    if c == Contender::Direct {
        return Ok(Instance {
            addr: env.upstream_addr(up),
            proc: None,
            log: None,
            hello: &[],
        });
    }
    let port = free_port()?;
    let log = env.guard.dir.join(format!("{}-{tag}.log", c.slug()));
    let mut cmd = command(c, env, port, up, tag)?;
    let file = fs::File::create(&log)?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let proc = Proc::spawn(c.name(), &mut cmd)?;
    let (addr, ns_pid) = if in_ns(c) {
        (env.upstream_addr(port), Some(proc.pid()))
    } else {
        (SocketAddr::from((Ipv4Addr::LOCALHOST, port)), None)
    };
    let mut inst = Instance {
        addr,
        proc: Some(proc),
        log: Some(log),
        hello: if c == Contender::AutoSni {
            hello::client_hello()
        } else {
            &[]
        },
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening(ns_pid, port) {
        check_stop()?;
        inst.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "{} does not listen on {addr} after 10 s; {}",
                c.name(),
                log_tail(inst.log.as_deref())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(inst)
}

/// The command that starts forwarder `c` (not `direct`) on 127.0.0.1:`port` (in the namespace:
/// [::]:`port`) in front of upstream port `up`; its configuration, if any, written beside the
/// log. `tag` names the files.
fn command(c: Contender, env: &Env, port: u16, up: u16, tag: &str) -> Result<Command> {
    let dir = &env.guard.dir;
    let iface = &env.guard.host_if;
    Ok(match c {
        Contender::Direct => unreachable!(),
        // Spelled out, not `is_spliced()`: the match stays exhaustive over new contenders.
        Contender::Auto
        | Contender::AutoSni
        | Contender::AutoNs
        | Contender::AutoXdp
        | Contender::Sockmap
        | Contender::Splice
        | Contender::Copy => {
            let config = dir.join(format!("{}-{tag}.toml", c.slug()));
            let control = dir.join(format!("{}-{tag}.sock", c.slug()));
            fs::write(&config, spliced_config(c, env, port, up, &control))?;
            let mut cmd = if in_ns(c) {
                env.guard.exec_in_ns(env.spliced)
            } else {
                Command::new(env.spliced)
            };
            cmd.arg("--config").arg(&config).env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
            cmd
        }
        Contender::Socat => {
            let mut cmd = Command::new("socat");
            cmd.arg(format!(
                "TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=4096"
            ))
            .arg(format!("TCP6:[fe80::2%{iface}]:{up}"));
            cmd
        }
        Contender::Haproxy => {
            let config = dir.join(format!("haproxy-{tag}.cfg"));
            fs::write(&config, haproxy_config(port, up, iface))?;
            let mut cmd = Command::new("haproxy");
            cmd.arg("-f").arg(&config).arg("-db");
            cmd
        }
        Contender::Proxyd => {
            let target = match env.proxyd_form {
                ProxydForm::Bracketed => format!("[fe80::2%{iface}]:{up}"),
                ProxydForm::Bare => format!("fe80::2%{iface}:{up}"),
            };
            let mut cmd = Command::new("systemd-socket-activate");
            cmd.args(["-l", &format!("127.0.0.1:{port}")])
                .arg(env.proxyd)
                .arg("--connections-max=100000")
                .arg(target);
            cmd
        }
    })
}

/// HAProxy's configuration as every bench run uses it (the main bench and `--time-wait`): TCP
/// mode, splice both ways, listening on 127.0.0.1:`port`, dialling fe80::2 port `up` through
/// `iface`.
pub fn haproxy_config(port: u16, up: u16, iface: &str) -> String {
    format!(
        "global\n    # maxconn: derived by HAProxy from the open-file limit\n\
         defaults\n    mode tcp\n    maxconn 100000\n    timeout connect 5s\n    \
         timeout client 10m\n    timeout server 10m\n    option splice-request\n    \
         option splice-response\n\
         frontend bench\n    bind 127.0.0.1:{port}\n    default_backend up\n\
         backend up\n    server s1 fe80::2:{up} source [::]:0 interface {iface}\n"
    )
}

/// Whether `c` runs in the upstream's namespace (`ip netns exec`, which execs it: its pid is
/// spliced's).
fn in_ns(c: Contender) -> bool {
    matches!(c, Contender::AutoNs | Contender::AutoXdp)
}

/// spliced's configuration for contender `c`, listening on `port`, upstream port `up`, its
/// control socket at `control` (not the default /run/spliced/control.sock, which another
/// spliced on the machine may hold).
fn spliced_config(c: Contender, env: &Env, port: u16, up: u16, control: &Path) -> String {
    let iface = &env.guard.host_if;
    let (listen, upstream) = if in_ns(c) {
        (format!("[::]:{port}"), format!("[::1]:{up}"))
    } else {
        (
            format!("127.0.0.1:{port}"),
            format!("[fe80::2%{iface}]:{up}"),
        )
    };
    let upstream = format!("upstream = \"{upstream}\"\n");
    let (mode, xdp, rules) = match c {
        Contender::AutoXdp => (
            "auto",
            format!("xdp = [\"{}\"]\nxdp_mode = \"generic\"\n", env.guard.ns_if),
            "allow = [\"0.0.0.0/0\", \"::/0\"]\nsyn_rate = 1000000\n",
        ),
        Contender::AutoSni | Contender::AutoNs => ("auto", String::new(), ""),
        _ => (c.slug(), String::new(), ""),
    };
    let routing = if c == Contender::AutoSni {
        format!(
            "\n[[route.match]]\nsni = [\"{}\"]\n{upstream}\n\
             [[route.match]]\nprotocol = \"other\"\n{upstream}",
            hello::SNI
        )
    } else {
        upstream
    };
    format!(
        "mode = \"{mode}\"\ngrace_period = \"0s\"\nmax_connections = 100000\n\
         control_socket = \"{}\"\n{xdp}\n\
         [[route]]\nname = \"bench\"\nlisten = \"{listen}\"\n{rules}{routing}",
        control.display()
    )
}

/// Whether a socket listens on `port` in the network namespace of `pid` (this one if none),
/// from `/proc/[PID/]net/tcp{,6}`: no connection needed, so nothing is triggered.
pub fn listening(pid: Option<u32>, port: u16) -> bool {
    let base = pid.map_or("/proc/net".to_string(), |p| format!("/proc/{p}/net"));
    let want = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|f| {
        fs::read_to_string(format!("{base}/{f}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.len() > 3 && w[1].ends_with(&want) && w[3] == "0A"
            })
    })
}

/// A free port on 127.0.0.1 (bound and released; nothing else here takes ports).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// "log: LAST LINES" for error messages.
pub fn log_tail(log: Option<&Path>) -> String {
    let Some(log) = log else {
        return String::new();
    };
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(6)..].join("\n  ");
    format!("{}: {tail}", log.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration both bench runs give HAProxy is one HAProxy accepts (`haproxy -c`).
    #[test]
    fn haproxy_accepts_its_config() {
        let text = haproxy_config(8443, 7000, "lo");
        assert!(text.contains("bind 127.0.0.1:8443\n"));
        assert!(text.contains("server s1 fe80::2:7000 source [::]:0 interface lo\n"));
        let path = std::env::temp_dir().join(format!("spliced-haproxy-{}.cfg", std::process::id()));
        fs::write(&path, &text).unwrap();
        let out = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output();
        let _ = fs::remove_file(&path);
        let out = out.expect("haproxy (from Debian's package; `cargo xtask test` installs it)");
        assert!(
            out.status.success(),
            "haproxy -c rejects the bench's config: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
