//! Writes spliced(8), generated from the clap definitions, to stdout (roff). `cargo xtask deb`
//! packages it; `man -l <(cargo run -q -p proxy-user --example manpage)` shows it.
use clap::CommandFactory as _;

fn main() -> std::io::Result<()> {
    let cmd = spliced::cli::Cli::command();
    let man = clap_mangen::Man::new(cmd)
        .section("8")
        .manual("System Manager's Manual");
    let mut out = Vec::new();
    man.render(&mut out)?;
    // Every subcommand gets its own section, after the main page.
    for sub in spliced::cli::Cli::command().get_subcommands() {
        let name = sub.get_name();
        if name == "help" {
            continue;
        }
        out.extend_from_slice(format!(".SH \"SPLICED {}\"\n", name.to_uppercase()).as_bytes());
        clap_mangen::Man::new(sub.clone()).render_description_section(&mut out)?;
        clap_mangen::Man::new(sub.clone()).render_options_section(&mut out)?;
    }
    out.extend_from_slice(EXTRA.as_bytes());
    std::io::Write::write_all(&mut std::io::stdout(), &out)
}

/// What clap does not know: signals, files, exit status.
const EXTRA: &str = r#".SH SIGNALS
.TP
SIGTERM, SIGINT
Stop accepting, let live connections run for grace_period, then reset the rest.
.TP
SIGHUP
Re\-read the \-\-config file: new routes start, removed routes stop accepting, changed routes
apply to new connections; established connections are untouched. An invalid file is logged
error by error and the running configuration stays.
.SH FILES
.TP
/etc/spliced/spliced.toml
The configuration (see the README for every key).
.TP
/run/spliced/control.sock
The control socket spliced status asks (control_socket), mode 0600.
.TP
/lib/systemd/system/spliced.service
The systemd unit (Type=notify; socket activation by route name).
.SH EXIT STATUS
0 on success; 64 (EX_USAGE) for a bad command line or configuration; 69 (EX_UNAVAILABLE) when
spliced status reaches no daemon; 1 when the daemon cannot start.
.SH SEE ALSO
systemctl(1), systemd.socket(5), bpf(2), splice(2)
"#;
