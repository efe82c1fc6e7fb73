//! The Debian package from `cargo xtask deb`: what it holds, with which modes; the packaged
//! binary runs, is stripped, and its debug info is in `spliced-dbgsym` under its build ID; the
//! packaged example configuration passes `spliced check`, the packaged unit passes
//! `systemd-analyze verify`, the man page is generated from the clap definitions and renders.
//! A second build from a copy of the checkout in another directory, later, gives the same bytes
//! (reproducible). The package is built and inspected, not installed (that would change the
//! machine): `cargo xtask system-test` installs it in a guest.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use tests::{stdout_of, TempDir};

#[test]
fn deb_holds_binary_unit_config_and_man_page() {
    let dir = TempDir::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let printed = stdout_of(
        Command::new(cargo)
            .current_dir(&root)
            .args(["xtask", "deb", "--output"])
            .arg(&dir.path),
    );
    let deb = PathBuf::from(printed.lines().last().expect("the .deb's path").trim());
    assert!(deb.starts_with(&dir.path), "{deb:?}");
    let name = deb.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        name.starts_with("spliced_") && name.ends_with(".deb"),
        "{name}"
    );

    let info = stdout_of(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for field in [
        "Package: spliced",
        "Depends: libc6 (>= 2.",
        ", adduser",
        "Architecture: ",
    ] {
        assert!(info.contains(field), "{field:?} missing:\n{info}");
    }
    let contents = stdout_of(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for (mode, path) in [
        ("-rwxr-xr-x root/root", "./usr/bin/spliced"),
        (
            "-rw-r--r-- root/root",
            "./lib/systemd/system/spliced.service",
        ),
        ("-rw-r--r-- root/root", "./etc/spliced/spliced.toml"),
        ("-rw-r--r-- root/root", "./usr/share/man/man8/spliced.8.gz"),
        ("-rw-r--r-- root/root", "./usr/share/doc/spliced/README.md"),
    ] {
        assert!(
            contents
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{mode} {path} missing:\n{contents}"
        );
    }

    let x = dir.path.join("x");
    stdout_of(
        Command::new("dpkg-deb")
            .arg("--raw-extract")
            .arg(&deb)
            .arg(&x),
    );
    assert_eq!(
        fs::read_to_string(x.join("DEBIAN/conffiles")).unwrap(),
        "/etc/spliced/spliced.toml\n"
    );
    let postinst = fs::read_to_string(x.join("DEBIAN/postinst")).unwrap();
    assert!(postinst.contains("adduser --system --group"), "{postinst}");
    let bin = x.join("usr/bin/spliced");
    let version = stdout_of(Command::new(&bin).arg("--version"));
    assert!(version.starts_with("spliced "), "{version}");
    debug_info_is_in_the_dbgsym_package(&deb, &bin, &dir.path);

    // The example configuration is valid (with a user that exists here: the package's postinst
    // creates "spliced", this test does not).
    let example = fs::read_to_string(x.join("etc/spliced/spliced.toml")).unwrap();
    assert!(example.contains("user = \"spliced\""), "{example}");
    let checked = dir.path.join("example.toml");
    fs::write(
        &checked,
        example.replace("user = \"spliced\"", "user = \"nobody\""),
    )
    .unwrap();
    let out = stdout_of(Command::new(&bin).args(["check", "--config"]).arg(&checked));
    assert!(out.ends_with(": ok, 1 route(s)\n"), "{out}");

    // The unit, with the extracted binary in place of /usr/bin/spliced, passes systemd's parser.
    let unit = fs::read_to_string(x.join("lib/systemd/system/spliced.service")).unwrap();
    let unit_copy = dir.path.join("spliced.service");
    fs::write(
        &unit_copy,
        unit.replace("/usr/bin/spliced", bin.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit_copy)
        .output()
        .unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");

    // The man page: generated from the clap definitions, every form and subcommand in it.
    let roff = stdout_of(
        Command::new("gzip")
            .args(["-dc"])
            .arg(x.join("usr/share/man/man8/spliced.8.gz")),
    );
    for needle in [
        ".TH spliced 8",
        "\\-\\-listen <ADDR> \\-\\-upstream <ADDR>",
        "spliced\\fR check \\-\\-config <FILE>",
        "spliced\\fR status",
        ".SH \"SPLICED STATUS\"",
        "\\fB\\-\\-socket\\fR",
        ".SH SIGNALS",
        "SIGHUP",
        "/etc/spliced/spliced.toml",
    ] {
        assert!(
            roff.contains(needle),
            "{needle:?} missing from the man page:\n{roff}"
        );
    }
    // groff renders it without a warning.
    let page = dir.path.join("spliced.8");
    fs::write(&page, &roff).unwrap();
    let out = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(&page)
        .output()
        .expect("run groff");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "groff: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    reproducible(&root, &deb, &dir.path);
}

/// The packaged binary has no symbols or debug sections; `spliced-dbgsym` has them, at
/// `/usr/lib/debug/.build-id/xx/yyyy.debug` for the binary's build ID, and depends on the exact
/// version.
fn debug_info_is_in_the_dbgsym_package(deb: &Path, bin: &Path, dir: &Path) {
    let sections = stdout_of(Command::new("readelf").args(["-S", "-W"]).arg(bin));
    for s in [".symtab", ".debug_info", ".debug_line"] {
        assert!(!sections.contains(s), "the packaged binary has {s}");
    }
    let notes = stdout_of(Command::new("readelf").arg("-n").arg(bin));
    let id = notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("a build ID")
        .to_owned();
    let name = deb.file_name().unwrap().to_str().unwrap();
    let dbg = deb.with_file_name(name.replacen("spliced_", "spliced-dbgsym_", 1));
    let info = stdout_of(Command::new("dpkg-deb").arg("--info").arg(&dbg));
    assert!(info.contains(&format!("Build-Ids: {id}")), "{info}");
    assert!(info.contains("Depends: spliced (= "), "{info}");
    let x = dir.join("dbg");
    stdout_of(Command::new("dpkg-deb").arg("-x").arg(&dbg).arg(&x));
    let debug = x.join(format!(
        "usr/lib/debug/.build-id/{}/{}.debug",
        &id[..2],
        &id[2..]
    ));
    let sections = stdout_of(Command::new("readelf").args(["-S", "-W"]).arg(&debug));
    assert!(sections.contains(".debug_info"), "{sections}");
    let notes = stdout_of(Command::new("readelf").arg("-n").arg(&debug));
    assert!(
        notes.contains(&id),
        "the debug file is for another build: {notes}"
    );
}

/// Builds the package again from a copy of the checkout (tracked and untracked files, no
/// `target/`, no `.git`: the commit's time comes in `SOURCE_DATE_EPOCH`, as from a source
/// tarball) in another directory, and compares the bytes of both packages.
fn reproducible(root: &Path, deb: &Path, dir: &Path) {
    let copy = dir.join("elsewhere/spliced-src");
    let files = stdout_of(Command::new("git").current_dir(root).args([
        "ls-files",
        "-z",
        "--cached",
        "--others",
        "--exclude-standard",
    ]));
    for f in files.split('\0').filter(|f| !f.is_empty()) {
        let from = root.join(f);
        if !from.is_file() {
            continue; // deleted in the work tree
        }
        let to = copy.join(f);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(&from, &to).unwrap();
    }
    let epoch =
        stdout_of(
            Command::new("git")
                .current_dir(root)
                .args(["log", "-1", "--format=%ct"]),
        );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("package");
    let out = dir.join("second");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let printed = stdout_of(
        Command::new(cargo)
            .current_dir(&copy)
            .env("SOURCE_DATE_EPOCH", epoch.trim())
            .env("SPLICED_PACKAGE_TARGET_DIR", &target)
            .args(["xtask", "deb", "--output"])
            .arg(&out),
    );
    let second = PathBuf::from(printed.lines().last().unwrap().trim());
    let name = deb.file_name().unwrap().to_str().unwrap();
    let dbg_name = name.replacen("spliced_", "spliced-dbgsym_", 1);
    for (a, b) in [
        (deb.to_path_buf(), second.clone()),
        (
            deb.with_file_name(&dbg_name),
            second.with_file_name(&dbg_name),
        ),
    ] {
        let (x, y) = (fs::read(&a).unwrap(), fs::read(&b).unwrap());
        if x != y {
            let list = |p: &Path| stdout_of(Command::new("dpkg-deb").args(["-c"]).arg(p));
            panic!(
                "{} differs between two builds ({} vs {} bytes):\n{}\n---\n{}",
                a.file_name().unwrap().to_string_lossy(),
                x.len(),
                y.len(),
                list(&a),
                list(&b)
            );
        }
    }
}
