//! The guest's whole root file system, as an uncompressed `newc` cpio archive: busybox-static,
//! iproute2's `ip` with its shared libraries, the `veth` module (decompressed, with the modules
//! it depends on, in load order), `/etc/hosts`, the static `spliced` and test binaries, and the
//! `/init` script that runs the suite and prints its markers on the console.
use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use super::{
    kernel::Kernel,
    userland::{Lib, Userland},
};
use crate::util::output;

/// One test binary the guest runs, with the libtest arguments that select its tests.
pub struct TestBin {
    /// `datapath`, `cli`: the name printed in the markers.
    pub name: String,
    pub path: PathBuf,
    pub filters: Vec<String>,
}

/// What goes into the archive, by path inside the guest.
#[derive(Default)]
struct Tree {
    entries: BTreeMap<String, Entry>,
}

enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

impl Tree {
    fn dir(&mut self, path: &str) {
        let mut p = String::new();
        for part in path.trim_matches('/').split('/') {
            if !p.is_empty() {
                p.push('/');
            }
            p.push_str(part);
            self.entries.entry(p.clone()).or_insert(Entry::Dir);
        }
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = path.trim_start_matches('/').rsplit_once('/') {
            self.dir(parent);
        }
    }

    fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.parent(path);
        self.entries.insert(
            path.trim_start_matches('/').to_string(),
            Entry::File { data, mode },
        );
    }

    fn copy(&mut self, path: &str, from: &Path, mode: u32) -> Result<()> {
        let data = fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
        self.file(path, data, mode);
        Ok(())
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.parent(path);
        self.entries.insert(
            path.trim_start_matches('/').to_string(),
            Entry::Symlink(target.to_string()),
        );
    }

    /// Writes the `newc` archive. Directories sort before their contents (BTreeMap order of
    /// `a` < `a/b`), which is all the kernel's unpacker needs.
    fn write(&self, w: &mut impl Write) -> io::Result<()> {
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            let (mode, data): (u32, &[u8]) = match entry {
                Entry::Dir => (0o040_755, &[]),
                Entry::File { data, mode } => (0o100_000 | mode, data),
                Entry::Symlink(t) => (0o120_777, t.as_bytes()),
            };
            cpio_entry(w, ino, path, mode, data)?;
        }
        cpio_entry(w, 0, "TRAILER!!!", 0, &[])
    }
}

fn cpio_entry(w: &mut impl Write, ino: u32, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        0,
        0,
        0,
        data.len(),
        0,
        0,
        0,
        0,
        name.len() + 1,
        0
    );
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad(w, header.len() + name.len() + 1)?;
    w.write_all(data)?;
    pad(w, data.len())
}

fn pad(w: &mut impl Write, len: usize) -> io::Result<()> {
    let n = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..n])
}

/// Busybox applets the init script uses (not `ip`: busybox's has no netns; iproute2's is used).
const APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "cat", "echo", "grep", "sed", "sleep", "kill", "insmod", "poweroff",
    "uname", "hostname", "ln", "rm", "head", "tail", "date", "cut", "tr", "seq", "ls", "test", "[",
    "timeout", "mktemp", "env", "ps", "wc", "dmesg", "sync",
];

/// Writes the archive for `kernel` to `out`.
pub fn build(
    kernel: &Kernel,
    userland: &Userland,
    spliced: &Path,
    tests: &[TestBin],
    env: &[(String, String)],
    out: &Path,
) -> Result<()> {
    let mut t = Tree::default();
    for d in [
        "proc", "sys", "dev", "tmp", "run", "root", "etc", "sbin", "usr/bin",
    ] {
        t.dir(d);
    }
    t.symlink("var/run", "../run");
    t.copy("bin/busybox", &userland.busybox(), 0o755)?;
    for applet in APPLETS {
        t.symlink(&format!("bin/{applet}"), "busybox");
    }
    match userland {
        Userland::Host => add_with_libs(&mut t, "/usr/sbin/ip")?,
        Userland::Foreign(_) => {
            t.copy("usr/sbin/ip", &userland.ip()?, 0o755)?;
            for (path, lib) in userland.libraries()? {
                match lib {
                    Lib::File(from) => t.copy(&path, &from, 0o755)?,
                    Lib::Symlink(target) => t.symlink(&path, &target),
                }
            }
        }
    }
    t.file(
        "etc/hosts",
        b"127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n".to_vec(),
        0o644,
    );
    t.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        0o644,
    );
    t.file("etc/group", b"root:x:0:\n".to_vec(), 0o644);
    t.copy("bin/spliced", spliced, 0o755)?;
    let modules = add_modules(&mut t, kernel, "veth")?;
    for test in tests {
        t.copy(&format!("tests/{}", test.name), &test.path, 0o755)?;
    }
    t.file(
        "init",
        init_script(&modules, tests, env).into_bytes(),
        0o755,
    );
    let mut file = io::BufWriter::new(
        fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?,
    );
    t.write(&mut file)?;
    file.flush()?;
    Ok(())
}

/// Copies `bin` and every shared library `ldd` lists for it, at the same paths.
fn add_with_libs(t: &mut Tree, bin: &str) -> Result<()> {
    t.copy(bin, Path::new(bin), 0o755)?;
    let ldd = output(Command::new("ldd").arg(bin))?;
    for line in ldd.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let real = fs::canonicalize(path).with_context(|| format!("cannot resolve {path}"))?;
        t.copy(path, &real, 0o755)?;
    }
    Ok(())
}

/// Adds module `name` and its dependencies (from each module's `depends=` field), decompressed,
/// as `lib/modules/<n>-<name>.ko`; returns the guest paths in load order (dependencies first).
fn add_modules(t: &mut Tree, kernel: &Kernel, name: &str) -> Result<Vec<String>> {
    let dir = kernel.modules_dir()?;
    let mut index = BTreeMap::new();
    index_modules(&dir.join("kernel"), &mut index)?;
    let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let mut order = Vec::new();
    load_order(name, &index, &builtin, &mut order, 0)?;
    let mut guest = Vec::new();
    for (i, (module, data)) in order.into_iter().enumerate() {
        let path = format!("lib/modules/{i:02}-{module}.ko");
        t.file(&path, data, 0o644);
        guest.push(format!("/{path}"));
    }
    Ok(guest)
}

/// Module name (`-` as `_`) -> file, for every `.ko`, `.ko.xz`, `.ko.zst` under `dir`.
fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            index_modules(&path, index)?;
            continue;
        }
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
            .iter()
            .find_map(|ext| file.strip_suffix(ext))
        {
            index.insert(stem.replace('-', "_"), path);
        }
    }
    Ok(())
}

fn load_order(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &str,
    order: &mut Vec<(String, Vec<u8>)>,
    depth: usize,
) -> Result<()> {
    let key = name.replace('-', "_");
    if order.iter().any(|(m, _)| *m == key) {
        return Ok(());
    }
    if depth > 16 {
        bail!("module dependencies of {name} nest too deep");
    }
    let Some(path) = index.get(&key) else {
        let built_in = builtin
            .lines()
            .any(|l| l.rsplit('/').next().and_then(|f| f.strip_suffix(".ko")) == Some(name));
        if built_in {
            return Ok(());
        }
        bail!("module {name} is neither a module nor built in");
    };
    let data = decompress(path)?;
    for dep in depends(&data) {
        load_order(&dep, index, builtin, order, depth + 1)?;
    }
    order.push((key, data));
    Ok(())
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("cannot read {name}"));
    };
    let out = Command::new(tool)
        .args(["-d", "-c"])
        .arg(path)
        .output()
        .with_context(|| format!("cannot run {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} -d {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// The `depends=a,b` field of a module's `.modinfo`.
fn depends(ko: &[u8]) -> Vec<String> {
    let needle = b"\0depends=";
    let Some(at) = ko.windows(needle.len()).position(|w| w == needle) else {
        return Vec::new();
    };
    let rest = &ko[at + needle.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The guest's `/init`. Every line meant for xtask starts with `SPLICED-VM:`.
fn init_script(modules: &[String], tests: &[TestBin], env: &[(String, String)]) -> String {
    let mut s = String::from(INIT_HEAD);
    for m in modules {
        s.push_str(&format!(
            "insmod {m} || echo \"SPLICED-VM: insmod {m} failed\"\n"
        ));
    }
    s.push_str(INIT_PROBE);
    for (k, v) in env {
        s.push_str(&format!("export {k}='{v}'\n"));
    }
    for test in tests {
        let filters: Vec<String> = test.filters.iter().map(|f| format!("'{f}'")).collect();
        s.push_str(&format!(
            "echo \"SPLICED-VM: start {name}\"\n\
             /tests/{name} --test-threads=2 {filters}\n\
             echo \"SPLICED-VM: exit {name} $?\"\n",
            name = test.name,
            filters = filters.join(" ")
        ));
    }
    s.push_str(INIT_TAIL);
    s
}

const INIT_HEAD: &str = r#"#!/bin/sh
export PATH=/usr/sbin:/bin:/sbin
export HOME=/root
mount -t proc proc /proc
# The kernel booted without `quiet` (its log shows where a hung boot stopped); from here on
# only errors, as `quiet` gives, so that its messages do not split the tests' lines.
echo 4 > /proc/sys/kernel/printk
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
hostname spliced-vm
/usr/sbin/ip link set lo up
echo "SPLICED-VM: kernel $(uname -r)"
echo "SPLICED-VM: version $(uname -v)"
"#;

/// Starts spliced in mode auto on a route to nowhere, reads which data path it chose (and why
/// not sockmap), and makes a missing sockmap fail the tests only where the probe passed.
const INIT_PROBE: &str = r#"RUST_LOG=info /bin/spliced --listen 127.0.0.1:0 --upstream 127.0.0.1:9 --mode auto >/tmp/auto.log 2>&1 &
pid=$!
for i in $(seq 1 120); do
    grep -q "listening on" /tmp/auto.log && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.5
done
kill $pid 2>/dev/null
sleep 0.2
kill -9 $pid 2>/dev/null
path=$(grep "listening on" /tmp/auto.log | grep -o "data path [a-z]*" | head -n 1 | cut -d' ' -f3)
echo "SPLICED-VM: auto ${path:-none}"
why=$(grep "sockmap unavailable" /tmp/auto.log | head -n 1 | sed 's/.*sockmap unavailable, auto routes use splice(2): //')
[ -n "$why" ] && echo "SPLICED-VM: why $why"
[ -z "$path" ] && cat /tmp/auto.log
if [ "$path" = sockmap ]; then
    export SPLICED_REQUIRE_EBPF=1
fi
export SPLICED_BIN=/bin/spliced
cd /tmp
"#;

const INIT_TAIL: &str = r#"echo "SPLICED-VM: done"
sync
poweroff -f
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_end_with_a_trailer() {
        let mut t = Tree::default();
        t.file("a/b/c", b"hello".to_vec(), 0o644);
        t.symlink("bin/sh", "busybox");
        let mut out = Vec::new();
        t.write(&mut out).unwrap();
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        // a, a/b, a/b/c, bin, bin/sh, trailer
        assert_eq!(text.matches("070701").count(), 6);
        assert!(text.contains("a/b/c\0"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!\0"));
        let a = text.find("a\0").unwrap();
        let abc = text.find("a/b/c\0").unwrap();
        assert!(a < abc, "directories first");
    }

    #[test]
    fn module_depends_field() {
        let ko = b"\x7fELF....\0license=GPL\0depends=nf_conntrack,libcrc32c\0retpoline=Y\0";
        assert_eq!(depends(ko), ["nf_conntrack", "libcrc32c"]);
        assert!(depends(b"\0depends=\0name=veth\0").is_empty());
        assert!(depends(b"nothing").is_empty());
    }
}
