//! The control socket: `spliced status` connects to the running daemon over a Unix socket and
//! gets the table of live connections back.
//!
//! The socket file is created mode 0600 (its directory, if spliced creates it, 0700), so only
//! root (the daemon's user) can connect; the daemon also checks the peer's credentials
//! (`SO_PEERCRED`) and answers only uid 0 or its own uid. The protocol is one text reply per
//! connection: the client connects, the daemon writes the table and closes.
use std::{
    fmt::Write as _,
    io::{self, Read},
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{io::AsyncWriteExt, net::UnixListener};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    registry::{Registry, Sample},
    xdp::{AttachMode, Reason, Refusals, SourceRules},
};

/// How long a status client may take to read the reply.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A bound control socket; the file is removed when the daemon stops (if it is still ours).
pub(crate) struct ControlSocket {
    path: PathBuf,
    /// Device and inode of the socket file we created, to remove only our own.
    id: (u64, u64),
    /// The socket's directory, if spliced created it.
    created_dir: Option<PathBuf>,
    task: tokio::task::JoinHandle<()>,
}

/// Binds the control socket at `path` and serves it until `stop`. A socket file left by a dead
/// daemon is replaced; one a live daemon answers on is left alone (this daemon then runs without
/// a control socket, with a warning). Never fatal: status is a convenience, forwarding is not.
pub(crate) fn start(
    path: &Path,
    registry: Arc<Registry>,
    stop: CancellationToken,
) -> Option<ControlSocket> {
    match bind(path) {
        Ok((listener, created_dir)) => {
            let id = std::fs::metadata(path)
                .map(|m| (m.dev(), m.ino()))
                .unwrap_or_default();
            let task = tokio::spawn(serve(listener, registry, stop));
            Some(ControlSocket {
                path: path.to_owned(),
                id,
                created_dir,
                task,
            })
        }
        Err(e) => {
            warn!(
                "control socket {}: {e}; `spliced status` will not reach this daemon (set \
                 control_socket in the configuration to another path)",
                path.display()
            );
            None
        }
    }
}

impl ControlSocket {
    /// Hands the socket file (and its directory, if spliced created it) to the user the daemon
    /// is about to become, so that it can remove them at exit. Still mode 0600/0700: root and
    /// that user only.
    pub(crate) fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        if let Some(dir) = &self.created_dir {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
        }
        std::os::unix::fs::chown(&self.path, Some(uid), Some(gid))
    }

    /// Stops serving and removes the socket file if it is still the one this daemon created.
    pub(crate) async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        if let Ok(m) = std::fs::metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn bind(path: &Path) -> io::Result<(UnixListener, Option<PathBuf>)> {
    let mut created_dir = None;
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            created_dir = Some(dir.to_owned());
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot create its directory: {e}"))
                })?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another spliced answers there",
            ));
        }
        // Left by a daemon that is gone.
        std::fs::remove_file(path)?;
    }
    // Created without group or other permissions from the start, not chmod-ed after the fact.
    // SAFETY: umask only changes this process's file creation mask; restored right after.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok((listener, created_dir))
}

async fn serve(listener: UnixListener, registry: Arc<Registry>, stop: CancellationToken) {
    // SAFETY: geteuid cannot fail.
    let own_uid = unsafe { libc::geteuid() };
    loop {
        let (mut stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    debug!("control socket: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let allowed = stream
            .peer_cred()
            .is_ok_and(|c| c.uid() == 0 || c.uid() == own_uid);
        let reply = if allowed {
            let mut text = render(&registry.samples());
            if let Some(steer) = crate::steer::loaded() {
                text.push_str(&render_lanes(&steer.live(), &steer.picks()));
            }
            if let Some(filters) = registry.filters() {
                text.push_str(&render_refusals(&filters.interfaces(), &filters.summary()));
            }
            text + "\n" + &crate::upstream::render_status(&registry.upstream_status())
        } else {
            "error: only root may ask spliced for its status\n".to_owned()
        };
        // One client at a time is plenty for a status command; a stuck one is cut off.
        let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        })
        .await;
    }
}

/// The status table: a summary line, a header and one line per live connection, columns
/// aligned and separated by two spaces. No field contains a space.
pub fn render(samples: &[Sample]) -> String {
    let mut rows = vec![[
        "ROUTE".to_owned(),
        "CLIENT".to_owned(),
        "UPSTREAM".to_owned(),
        "PATH".to_owned(),
        "BYTES_UP".to_owned(),
        "BYTES_DOWN".to_owned(),
        "AGE".to_owned(),
        "IDLE".to_owned(),
        "ROUTING".to_owned(),
        "VIA".to_owned(),
    ]];
    for s in samples {
        rows.push([
            s.route.clone(),
            s.client.to_string(),
            s.upstream.map_or("(dialing)".into(), |u| u.to_string()),
            s.path.map_or("-".into(), |p| p.to_string()),
            s.bytes_up.to_string(),
            s.bytes_down.to_string(),
            seconds(s.age),
            seconds(s.idle),
            // `rule=match[0],peek=matched,sni=blog.example.com`: no spaces in a field.
            s.routing
                .as_deref()
                .map_or("-".into(), |r| r.replace(' ', ",")),
            // The front proxy whose PROXY header named the client.
            s.via.map_or("-".into(), |v| v.to_string()),
        ]);
    }
    format!(
        "{} live connection(s)\n{}",
        samples.len(),
        crate::text::columns(&rows)
    )
}

/// The source rules' part of the status: where the XDP front runs, and for each route with
/// rules (or refusals) its refusals by reason, in XDP and at accept. Empty without rules.
pub fn render_refusals(
    interfaces: &[(String, AttachMode)],
    routes: &[(String, SourceRules, [Refusals; 2])],
) -> String {
    let mut out = String::new();
    if !interfaces.is_empty() {
        let list: Vec<String> = interfaces
            .iter()
            .map(|(n, m)| format!("{n} ({m})"))
            .collect();
        let _ = writeln!(out, "XDP front on {}", list.join(", "));
    }
    for (name, rules, counts) in routes {
        if rules.is_empty() && counts.iter().all(|c| c.xdp + c.accept == 0) {
            continue;
        }
        let parts: Vec<String> = Reason::ALL
            .iter()
            .zip(counts)
            .map(|(r, c)| {
                let (xdp, accept) = (c.xdp, c.accept);
                format!(
                    "{} {} (xdp {xdp}, accept {accept})",
                    r.label(),
                    xdp + accept
                )
            })
            .collect();
        let _ = writeln!(out, "route {name} refused: {}", parts.join(", "));
    }
    out
}

/// The accept steering's line, once the lanes accept (empty before, or with one lane): each
/// lane's live connections and the connections the program handed it so far.
pub fn render_lanes(live: &[u64], steered: &[u64]) -> String {
    if live.len() < 2 {
        return String::new();
    }
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
    format!(
        "accepting on {} lanes: live {}, steered {}\n",
        live.len(),
        list(live),
        list(steered)
    )
}

fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Why `spliced status` got no table.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No daemon answers at the path (or we may not ask it).
    #[error("cannot reach spliced at {}: {source}{}", .path.display(), connect_hint(.source))]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The daemon's reply broke off.
    #[error("reading the status from {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The daemon answered with an error of its own (its text).
    #[error("{0}")]
    Refused(String),
}

fn connect_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            " (is spliced running? with --config FILE, give the same file here, or --socket PATH \
             for its control_socket)"
        }
        io::ErrorKind::PermissionDenied => " (only root may ask spliced for its status)",
        _ => "",
    }
}

/// The client side of `spliced status`: connects to `path` and returns the daemon's reply.
pub fn query(path: &Path) -> Result<String, QueryError> {
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| QueryError::Connect {
            path: path.to_owned(),
            source,
        })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|source| QueryError::Read {
            path: path.to_owned(),
            source,
        })?;
    match reply.strip_prefix("error: ") {
        Some(e) => Err(QueryError::Refused(e.trim_end().to_owned())),
        None => Ok(reply),
    }
}

#[cfg(test)]
mod tests;
