use super::*;
use clap::{error::ErrorKind, CommandFactory};
use std::time::Duration;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("spliced").chain(args.iter().copied()))
}

fn parse_err(args: &[&str]) -> ErrorKind {
    parse(args).expect_err("should be refused").kind()
}

fn errors(args: &[&str]) -> Vec<String> {
    parse(args)
        .unwrap()
        .into_config()
        .expect_err("should be refused")
        .into_iter()
        .map(|e| e.to_string())
        .collect()
}

#[test]
fn clap_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn listen_upstream_form() {
    let cli = parse(&["--listen", "127.0.0.1:0", "--upstream", "10.0.0.2:80"]).unwrap();
    assert_eq!(cli.listen.as_deref(), Some("127.0.0.1:0"));
    assert_eq!(cli.upstream.as_deref(), Some("10.0.0.2:80"));
    assert_eq!(cli.mode, None);
    assert!(cli.config.is_none() && cli.command.is_none());
    let config = cli.into_config().unwrap();
    assert_eq!(config.routes.len(), 1);
    let route = &config.routes[0];
    assert_eq!(route.name, "cli");
    assert_eq!(route.listen.to_string(), "127.0.0.1:0");
    assert_eq!(route.upstream_text(), "10.0.0.2:80");
    assert_eq!(route.mode, Mode::Auto);
    assert_eq!(route.connect_timeout, Duration::from_secs(5));
    assert_eq!(config.grace_period, Duration::from_secs(30));
    assert_eq!(config.send_buffer, Some(16 << 20));
    assert_eq!(config.max_connections, 10_000);
}

#[test]
fn mode_option() {
    for (arg, mode) in [
        ("auto", Mode::Auto),
        ("sockmap", Mode::Sockmap),
        ("splice", Mode::Splice),
        ("copy", Mode::Copy),
    ] {
        let cli = parse(&[
            "--listen",
            "[::1]:8080",
            "--upstream",
            "[fe80::1%lo]:2368",
            "--mode",
            arg,
        ])
        .unwrap();
        assert_eq!(cli.mode, Some(mode));
        assert_eq!(cli.into_config().unwrap().routes[0].mode, mode);
    }
    assert_eq!(
        parse_err(&[
            "--listen",
            "[::1]:8080",
            "--upstream",
            "[::1]:80",
            "--mode",
            "fast"
        ]),
        ErrorKind::InvalidValue
    );
}

#[test]
fn config_form() {
    let cli = parse(&["--config", "/etc/spliced.toml"]).unwrap();
    assert_eq!(cli.config, Some(PathBuf::from("/etc/spliced.toml")));
    assert!(cli.listen.is_none() && cli.command.is_none());
}

#[test]
fn check_form() {
    let cli = parse(&["check", "--config", "spliced.toml"]).unwrap();
    match cli.command {
        Some(Command::Check { config }) => assert_eq!(config, PathBuf::from("spliced.toml")),
        _ => panic!("expected the check subcommand"),
    }
    assert!(cli.config.is_none());
}

#[test]
fn one_form_is_required() {
    assert_eq!(parse_err(&[]), ErrorKind::MissingRequiredArgument);
    assert_eq!(parse_err(&["check"]), ErrorKind::MissingRequiredArgument);
}

#[test]
fn listen_and_upstream_go_together() {
    assert_eq!(
        parse_err(&["--listen", "127.0.0.1:0"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        parse_err(&["--upstream", "10.0.0.2:80"]),
        ErrorKind::MissingRequiredArgument
    );
}

#[test]
fn listen_conflicts_with_config() {
    assert_eq!(
        parse_err(&[
            "--config",
            "f.toml",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "10.0.0.2:80"
        ]),
        ErrorKind::ArgumentConflict
    );
    assert_eq!(
        parse_err(&["--config", "f.toml", "--upstream", "10.0.0.2:80"]),
        ErrorKind::ArgumentConflict
    );
}

#[test]
fn mode_only_with_listen() {
    assert_eq!(
        parse_err(&["--config", "f.toml", "--mode", "copy"]),
        ErrorKind::ArgumentConflict
    );
    assert_eq!(
        parse_err(&["--mode", "copy"]),
        ErrorKind::MissingRequiredArgument
    );
}

#[test]
fn check_takes_no_run_options() {
    assert_eq!(
        parse_err(&[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "10.0.0.2:80",
            "check",
            "--config",
            "f"
        ]),
        ErrorKind::ArgumentConflict
    );
    assert_eq!(
        parse_err(&["check", "--config", "f", "--listen", "127.0.0.1:0"]),
        ErrorKind::UnknownArgument
    );
    assert_eq!(parse_err(&["bogus"]), ErrorKind::InvalidSubcommand);
}

#[test]
fn help_and_version() {
    assert_eq!(parse_err(&["--help"]), ErrorKind::DisplayHelp);
    assert_eq!(parse_err(&["--version"]), ErrorKind::DisplayVersion);
    let help = Cli::command().render_long_help().to_string();
    assert!(help.contains("--listen <ADDR>"), "{help}");
    assert!(help.contains("sockmap"), "{help}");
}

#[test]
fn error_bad_listen_and_upstream_both_reported() {
    assert_eq!(
        errors(&["--listen", "localhost:8080", "--upstream", "fe80::1:80"]),
        vec![
            r#"--listen: "localhost:8080": listen addresses must be IP literals, not host names; write e.g. "127.0.0.1:8080" or "[::1]:8080""#,
            r#"--upstream: "fe80::1:80": an IPv6 address needs brackets: write "[fe80::1]:80" (a link-local address also needs its interface: "[fe80::1%eth0]:80")"#,
        ]
    );
}

#[test]
fn error_unknown_zone_interface() {
    assert_eq!(
        errors(&[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "[fe80::1%nosuchif0]:2368"
        ]),
        vec![
            r#"--upstream: interface "nosuchif0" (the zone of "[fe80::1%nosuchif0]:2368") does not exist on this machine; fix the name or create the interface first (ip link shows the interfaces)"#
        ]
    );
}

#[test]
fn error_unreadable_config() {
    let errs = errors(&["--config", "/nonexistent/spliced.toml"]);
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("/nonexistent/spliced.toml: cannot read the configuration file: "),
        "{errs:?}"
    );
    let errs = errors(&["check", "--config", "/nonexistent/spliced.toml"]);
    assert!(errs[0].contains("cannot read"), "{errs:?}");
}

#[test]
fn error_nothing_to_run() {
    let cli = Cli {
        listen: None,
        upstream: None,
        mode: None,
        config: None,
        command: None,
    };
    let errs: Vec<String> = cli
        .into_config()
        .unwrap_err()
        .into_iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        errs,
        vec!["nothing to run; give --listen ADDR --upstream ADDR, or --config FILE"]
    );
}

#[test]
fn config_file_is_loaded() {
    let dir = std::env::temp_dir().join(format!("spliced-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("spliced.toml");
    std::fs::write(
        &path,
        "mode = \"copy\"\n[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"10.0.0.2:80\"\n",
    )
    .unwrap();
    let config = parse(&["--config", path.to_str().unwrap()])
        .unwrap()
        .into_config()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(config.routes.len(), 1);
    assert_eq!(config.routes[0].name, "a");
    assert_eq!(config.routes[0].mode, Mode::Copy);
}

#[test]
fn status_form() {
    match parse(&["status"]).unwrap().command {
        Some(Command::Status { socket, config }) => {
            assert_eq!((socket, config), (None, None));
        }
        other => panic!("expected status, got {other:?}"),
    }
    match parse(&["status", "--socket", "/tmp/c.sock"])
        .unwrap()
        .command
    {
        Some(Command::Status { socket, .. }) => {
            assert_eq!(socket, Some(PathBuf::from("/tmp/c.sock")));
        }
        other => panic!("expected status, got {other:?}"),
    }
    assert!(parse(&["status", "--config", "f.toml"]).is_ok());
    assert_eq!(
        parse_err(&["status", "--socket", "/s", "--config", "f.toml"]),
        ErrorKind::ArgumentConflict
    );
    assert_eq!(
        parse_err(&["status", "--listen", "127.0.0.1:0"]),
        ErrorKind::UnknownArgument
    );
}
