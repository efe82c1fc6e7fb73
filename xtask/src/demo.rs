//! `cargo xtask demo`: spliced in front of an HTTP server that is reachable only at an IPv6
//! link-local address inside a network namespace, the situation of a service in a container on a
//! host bridge. Performs a curl through spliced, prints it, serves until Ctrl-C, then cleans up.
//!
//! `SPLICED_DEMO_ONESHOT=1` stops after the curl (for a non-interactive check).
use std::{
    env, fs,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{describe, is_root, output, reexec_as_root, run};

const NETNS: &str = "spliced-demo";
const HOST_IF: &str = "spld0";
const NETNS_IF: &str = "spld1";
const UPSTREAM_PORT: u16 = 8080;
const MARKER: &str = "served from fe80::2 inside network namespace spliced-demo";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn command() -> Result<()> {
    if !is_root() {
        reexec_as_root()?;
    }
    crate::setup::run()?;
    let bin = crate::build::build_spliced(false)?;
    let mut demo = Demo::default();
    let result = demo.run(&bin);
    demo.clean_up();
    result
}

/// What the demo created, removed by `clean_up` on every way out.
#[derive(Default)]
struct Demo {
    netns: bool,
    dir: Option<PathBuf>,
    server: Option<Child>,
    spliced: Option<Child>,
}

impl Demo {
    fn run(&mut self, bin: &Path) -> Result<()> {
        catch_signals();
        self.topology()?;
        let upstream = self.serve()?;
        let listen = self.start_spliced(bin, &upstream)?;
        fetch(&listen)?;
        thread::sleep(Duration::from_millis(300));
        println!(
            "\nspliced forwards {listen} -> {upstream} (an IPv6 link-local address with its zone).\n\
             Try: curl http://{listen}/   Press Ctrl-C to stop and clean up."
        );
        if env::var_os("SPLICED_DEMO_ONESHOT").is_some() {
            return Ok(());
        }
        while !STOP.load(Ordering::SeqCst) {
            if let Some(status) = self
                .spliced
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("spliced exited on its own: {status}");
            }
            thread::sleep(Duration::from_millis(100));
        }
        eprintln!("demo: stopping");
        Ok(())
    }

    /// The HTTP server in the namespace, serving a marked page and 64 MiB from a directory of
    /// its own; returns its address once it answers.
    fn serve(&mut self) -> Result<String> {
        let dir = env::temp_dir().join(format!("spliced-demo-{}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        self.dir = Some(dir.clone());
        fs::write(dir.join("index.html"), format!("<p>Hello! {MARKER}.</p>\n"))?;
        fs::write(dir.join("64MiB.bin"), vec![0x5a; 64 << 20])?;
        let server = Command::new("ip")
            .args(["netns", "exec", NETNS, "python3", "-m", "http.server"])
            .args(["--bind", "::", "--directory"])
            .arg(&dir)
            .arg(UPSTREAM_PORT.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start python3 -m http.server in the namespace")?;
        self.server = Some(server);
        let upstream = format!("[fe80::2%{HOST_IF}]:{UPSTREAM_PORT}");
        wait_until("the HTTP server in the namespace answers", || {
            curl(&format!("http://{upstream}/"), &[]).is_ok()
        })?;
        Ok(upstream)
    }

    /// spliced on a free port of 127.0.0.1 in front of `upstream`; returns its listening
    /// address once it accepts.
    fn start_spliced(&mut self, bin: &Path, upstream: &str) -> Result<String> {
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        eprintln!(
            "demo: starting {} --listen {listen} --upstream {upstream}",
            bin.display()
        );
        let spliced = Command::new(bin)
            .args(["--listen", &listen, "--upstream", upstream])
            .env(
                "RUST_LOG",
                env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .spawn()
            .context("cannot start spliced")?;
        self.spliced = Some(spliced);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        wait_until("spliced listens", || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })?;
        thread::sleep(Duration::from_millis(200));
        Ok(listen)
    }

    fn topology(&mut self) -> Result<()> {
        // A demo killed hard leaves its namespace behind: start from scratch.
        if output(Command::new("ip").args(["netns", "list"]))?
            .lines()
            .any(|l| l.split_whitespace().next() == Some(NETNS))
        {
            run(Command::new("ip").args(["netns", "delete", NETNS]))?;
        }
        if crate::util::interface_exists(HOST_IF) {
            run(Command::new("ip").args(["link", "delete", HOST_IF]))?;
        }
        run(Command::new("ip").args(["netns", "add", NETNS]))?;
        self.netns = true;
        let steps: &[&[&str]] = &[
            &[
                "link", "add", HOST_IF, "type", "veth", "peer", "name", NETNS_IF, "netns", NETNS,
            ],
            &["addr", "add", "fe80::1/64", "dev", HOST_IF, "nodad"],
            &["link", "set", HOST_IF, "up"],
            &[
                "-n",
                NETNS,
                "addr",
                "add",
                "fe80::2/64",
                "dev",
                NETNS_IF,
                "nodad",
            ],
            &["-n", NETNS, "link", "set", NETNS_IF, "up"],
            &["-n", NETNS, "link", "set", "lo", "up"],
        ];
        for args in steps {
            run(Command::new("ip").args(*args))?;
        }
        eprintln!(
            "demo: namespace {NETNS}: veth {HOST_IF} (fe80::1, host) <-> {NETNS_IF} (fe80::2)"
        );
        Ok(())
    }

    fn clean_up(&mut self) {
        if let Some(mut child) = self.spliced.take() {
            stop(&mut child, "spliced");
        }
        if let Some(mut child) = self.server.take() {
            stop(&mut child, "the HTTP server");
        }
        if self.netns {
            // Deleting the namespace deletes the veth pair with it.
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "delete", NETNS]);
            if let Err(e) = run(&mut cmd) {
                eprintln!("demo: cleanup: {e:#}; remove it with `{}`", describe(&cmd));
            }
        }
        if let Some(dir) = self.dir.take() {
            let _ = fs::remove_dir_all(dir);
        }
        eprintln!("demo: cleaned up");
    }
}

/// Ctrl-C and SIGTERM only set [`STOP`]; exec resets the handlers to the default in the
/// children, so Ctrl-C (sent to the whole foreground group) also reaches spliced and the server.
fn catch_signals() {
    // SAFETY: `on_signal` is async-signal-safe (one atomic store).
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

/// The page and the 64 MiB file through spliced at `listen`, each checked; prints both.
fn fetch(listen: &str) -> Result<()> {
    let url = format!("http://{listen}/");
    eprintln!("demo: $ curl -sS {url}");
    let body = curl(&url, &[])?;
    print!("{body}");
    if !body.contains(MARKER) {
        bail!("the page fetched through spliced is not the upstream's: {body:?}");
    }
    let big = format!("http://{listen}/64MiB.bin");
    eprintln!("demo: $ curl -sS -o /dev/null {big}");
    let stats = curl(
        &big,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} bytes at %{speed_download} bytes/s",
        ],
    )?;
    println!("{stats}");
    if !stats.starts_with(&(64u64 << 20).to_string()) {
        bail!("the 64 MiB download through spliced came back short: {stats}");
    }
    Ok(())
}

/// SIGTERM, up to 5 s for a clean exit, then SIGKILL.
fn stop(child: &mut Child, what: &str) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("demo: {what} did not stop within 5 s; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

fn curl(url: &str, extra: &[&str]) -> Result<String> {
    output(
        Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "30", "-g"])
            .args(extra)
            .arg(url),
    )
}

/// Polls `ready` every 100 ms for at most 10 s.
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    for _ in 0..100 {
        if ready() {
            return Ok(());
        }
        if STOP.load(Ordering::SeqCst) {
            bail!("interrupted while waiting until {what}");
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("gave up after 10 s waiting until {what}")
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}
