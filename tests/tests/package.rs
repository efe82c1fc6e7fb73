//! The Debian package from `cargo xtask deb`: what it holds, with which modes; the packaged
//! binary runs, the packaged example configuration passes `spliced check`, the packaged unit
//! passes `systemd-analyze verify`, the man page is generated from the clap definitions and
//! renders. The package is built and inspected, not installed (that would change the machine).
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
        "Depends: libc6, adduser",
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
}
