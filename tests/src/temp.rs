//! [`TempDir`]: a temporary directory for a test's configuration files and control socket;
//! [`TempConfig`]: a configuration file in one.
use std::{
    fs,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

/// A directory `spliced-test-<pid>-<n>` in the temporary directory, removed on drop. Made with
/// std rather than the tempfile crate: it must stay searchable (0755) by a daemon that dropped
/// root, as a /run directory is.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("spliced-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }

    /// The path of `name` in the directory.
    pub fn file(&self, name: &str) -> String {
        self.path.join(name).to_str().unwrap().to_owned()
    }

    /// Writes `text` to the file `name`; returns its path.
    pub fn write_file(&self, name: &str, text: &str) -> String {
        let path = self.file(name);
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {path}: {e}"));
        path
    }

    /// The control socket the configuration of [`TempDir::write`] names.
    pub fn socket(&self) -> String {
        self.file("control.sock")
    }

    /// The configuration file [`TempDir::write`] writes.
    pub fn config(&self) -> String {
        self.file("spliced.toml")
    }

    /// Writes the configuration: `mode`, the control socket, `top` keys, then one route per
    /// entry of `routes` (name, upstream, extra route keys), all listening on 127.0.0.1:0.
    /// Returns the file's path.
    pub fn write(&self, mode: &str, top: &str, routes: &[(&str, &str, &str)]) -> String {
        let mut text = format!(
            "mode = \"{mode}\"\ncontrol_socket = \"{}\"\n{top}\n",
            self.socket()
        );
        for (name, upstream, extra) in routes {
            text += &format!(
                "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n{extra}\n"
            );
        }
        self.write_file("spliced.toml", &text)
    }
}

/// A configuration file alone in a [`TempDir`] of its own, removed on drop.
pub struct TempConfig {
    _dir: TempDir,
    path: String,
}

impl TempConfig {
    pub fn new(text: &str) -> TempConfig {
        let dir = TempDir::new();
        let path = dir.write_file("spliced.toml", text);
        TempConfig { _dir: dir, path }
    }

    pub fn path(&self) -> &str {
        &self.path
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
