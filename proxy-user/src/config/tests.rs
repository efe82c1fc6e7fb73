use super::{document::line_column, value::edit_distance, *};
use crate::addr::Host;

pub(super) const FILE: &str = "spliced.toml";

/// The configuration `text` describes; panics with every error if it has any.
pub(super) fn load(text: &str) -> Config {
    Config::from_toml(Path::new(FILE), text).unwrap_or_else(|errors| {
        let errors: Vec<String> = errors.into_iter().map(|e| e.to_string()).collect();
        panic!("should load: {errors:#?}")
    })
}

/// Every error of `text`, rendered; panics if it loads.
pub(super) fn errors(text: &str) -> Vec<String> {
    match Config::from_toml(Path::new(FILE), text) {
        Ok(c) => panic!("should be refused, got {c:#?}"),
        Err(errors) => errors.into_iter().map(|e| e.to_string()).collect(),
    }
}

/// The single error of `text`.
fn error(text: &str) -> String {
    let mut errors = errors(text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    errors.remove(0)
}

/// A file with one valid route and `extra` appended to the route's table.
fn route_with(extra: &str) -> String {
    format!(
            "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nupstream = \"10.0.0.2:80\"\n{extra}\n"
        )
}

/// A file with `top` at the top level and one valid route.
fn top_with(top: &str) -> String {
    format!("{top}\n{}", route_with(""))
}

#[test]
fn full_example() {
    let config = load(
        r#"
# all top-level keys optional
mode = "splice"
grace_period = "10s"
send_buffer = "4MiB"
max_connections = 500

[[route]]
name = "ghost"
listen = "127.0.0.1:8080"
upstream = "[fe80::216:3eff:fe12:3456%lo]:2368"
mode = "sockmap"
interface = "lo"
connect_timeout = "250ms"

[[route]]
name = "web.v2_b-1"
listen = "[::1]:0"
upstream = "example.com:443"
"#,
    );
    assert_eq!(config.grace_period, Duration::from_secs(10));
    assert_eq!(config.send_buffer, Some(4 << 20));
    assert_eq!(config.max_connections, 500);
    assert_eq!(config.routes.len(), 2);
    let ghost = &config.routes[0];
    assert_eq!(ghost.name, "ghost");
    assert_eq!(ghost.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(ghost.upstream_text(), "[fe80::216:3eff:fe12:3456%lo]:2368");
    assert_eq!(ghost.mode, Mode::Sockmap);
    assert_eq!(ghost.interface.as_deref(), Some("lo"));
    assert_eq!(ghost.connect_timeout, Duration::from_millis(250));
    let web = &config.routes[1];
    assert_eq!(web.name, "web.v2_b-1");
    assert_eq!(web.mode, Mode::Splice, "the top-level mode is the default");
    assert_eq!(web.interface, None);
    assert_eq!(web.connect_timeout, Duration::from_secs(5));
    assert_eq!(
        web.upstream.servers[0].address.host,
        Host::Name("example.com".into())
    );
}

#[test]
fn defaults_match_config_new() {
    let config = load(&route_with(""));
    let defaults = Config::new(Vec::new());
    assert_eq!(config.grace_period, defaults.grace_period);
    assert_eq!(config.grace_period, Duration::from_secs(30));
    assert_eq!(config.send_buffer, Some(16 << 20));
    assert_eq!(config.max_connections, 10_000);
    assert_eq!(config.routes[0].mode, Mode::Auto);
    assert_eq!(config.routes[0].connect_timeout, Duration::from_secs(5));
}

#[test]
fn route_constructors() {
    let route = Route::new(
        "r",
        Endpoint::parse_listen("127.0.0.1:0").unwrap(),
        "10.0.0.2:80".parse().unwrap(),
    );
    assert_eq!(route.mode, Mode::Auto);
    assert_eq!(route.with_mode(Mode::Copy).mode, Mode::Copy);
}

#[test]
fn modes() {
    for mode in Mode::ALL {
        let config = load(&top_with(&format!("mode = \"{mode}\"")));
        assert_eq!(config.routes[0].mode, mode);
        let config = load(&route_with(&format!("mode = \"{mode}\"")));
        assert_eq!(config.routes[0].mode, mode);
    }
    let config = load(&format!(
        "mode = \"copy\"\n{}",
        route_with("mode = \"splice\"")
    ));
    assert_eq!(config.routes[0].mode, Mode::Splice, "a route's mode wins");
}

#[test]
fn durations() {
    for (text, expected) in [
        ("0s", Duration::ZERO),
        ("250ms", Duration::from_millis(250)),
        ("5s", Duration::from_secs(5)),
        ("2m", Duration::from_secs(120)),
        ("1h", Duration::from_secs(3600)),
    ] {
        let config = load(&top_with(&format!("grace_period = \"{text}\"")));
        assert_eq!(config.grace_period, expected, "{text}");
    }
    let config = load(&route_with("connect_timeout = \"1h\""));
    assert_eq!(config.routes[0].connect_timeout, Duration::from_secs(3600));
    let config = load(&route_with("connect_timeout = \"1ms\""));
    assert_eq!(config.routes[0].connect_timeout, Duration::from_millis(1));
}

#[test]
fn sizes() {
    for (text, expected) in [
        ("4096", Some(4096)),
        ("\"4096\"", Some(4096)),
        ("\"4096B\"", Some(4096)),
        ("\"512KiB\"", Some(512 << 10)),
        ("\"16MiB\"", Some(16 << 20)),
        ("\"1GiB\"", Some(1 << 30)),
        ("1073741824", Some(1 << 30)),
        ("0", None),
        ("\"0\"", None),
        ("\"0MiB\"", None),
    ] {
        let config = load(&top_with(&format!("send_buffer = {text}")));
        assert_eq!(config.send_buffer, expected, "{text}");
    }
}

#[test]
fn max_connections_bounds() {
    assert_eq!(load(&top_with("max_connections = 1")).max_connections, 1);
    assert_eq!(
        load(&top_with(&format!("max_connections = {MAX_CONNECTIONS}"))).max_connections,
        MAX_CONNECTIONS
    );
}

#[test]
fn inline_route_tables() {
    let config =
        load("route = [{ name = \"a\", listen = \"127.0.0.1:1\", upstream = \"10.0.0.2:80\" }]\n");
    assert_eq!(config.routes[0].name, "a");
}

#[test]
fn listen_addresses_that_do_not_conflict() {
    let config = load(
        r#"
[[route]]
name = "a"
listen = "127.0.0.1:0"
upstream = "10.0.0.2:80"
[[route]]
name = "b"
listen = "127.0.0.1:0"
upstream = "10.0.0.2:80"
[[route]]
name = "c"
listen = "127.0.0.1:81"
upstream = "10.0.0.2:80"
[[route]]
name = "d"
listen = "127.0.0.2:81"
upstream = "10.0.0.2:80"
[[route]]
name = "e"
listen = "[::1]:81"
upstream = "10.0.0.2:80"
"#,
    );
    assert_eq!(config.routes.len(), 5);
}

#[test]
fn line_and_column() {
    let text = "a\nbé = 1\n\nxyz";
    assert_eq!(line_column(text, 0), (1, 1));
    assert_eq!(line_column(text, 2), (2, 1));
    // 'é' is two bytes but one column.
    assert_eq!(line_column(text, text.find('=').unwrap()), (2, 4));
    assert_eq!(line_column(text, text.find('x').unwrap()), (4, 1));
    assert_eq!(line_column(text, text.len() + 10), (4, 4));
    // Inside a multi-byte character: the character's column.
    assert_eq!(line_column(text, text.find('é').unwrap() + 1), (2, 2));
}

#[test]
fn edit_distances() {
    assert_eq!(edit_distance("listen", "listen"), 0);
    assert_eq!(edit_distance("listne", "listen"), 2);
    assert_eq!(edit_distance("upstrem", "upstream"), 1);
    assert_eq!(edit_distance("", "abc"), 3);
}

#[test]
fn spec_example_error() {
    let text = r#"[[route]]
name = "a"
listen = "127.0.0.1:8080"
upstream = "10.0.0.2:80"

[[route]]
upstream = "fe80::1:80"
name = "b"
listen = "127.0.0.1:8081"
"#;
    assert_eq!(
        error(text),
        r#"spliced.toml:7:12: route[1].upstream: "fe80::1:80": an IPv6 address needs brackets: write "[fe80::1]:80" (a link-local address also needs its interface: "[fe80::1%eth0]:80")"#
    );
}

#[test]
fn collects_every_error_in_file_order() {
    let text = r#"mode = "fast"
grace = 5
send_buffer = "2GiB"

[[route]]
name = "ghost"
listen = "127.0.0.1:8080"
upstream = "[fe80::1]:80"

[[route]]
name = "ghost"
listen = "127.0.0.1:8080"
upstream = "10.0.0.2:80"
mode = 3
"#;
    assert_eq!(
        errors(text),
        vec![
            r#"spliced.toml:1:8: mode: "fast" is not a mode; use one of auto, sockmap, splice, copy"#,
            r#"spliced.toml:2:1: grace: unknown key; valid top-level keys are `mode`, `grace_period`, `send_buffer`, `max_connections`, `max_buffered`, `max_buffered_total`, `control_socket`, `metrics`, `user`, `xdp`, `xdp_mode`, `workers`, `pin_lanes`, [[route]] tables"#,
            r#"spliced.toml:3:15: send_buffer: "2GiB" is more than the maximum of 1GiB; use e.g. "16MiB", or 0 for the kernel's autotuning"#,
            r#"spliced.toml:8:12: route[0].upstream: "[fe80::1]:80": fe80::1 is a link-local address (fe80::/10), which exists on every interface; name the interface with "%", e.g. "[fe80::1%eth0]:80""#,
            r#"spliced.toml:11:8: route[1].name: "ghost" is already the name of route[0]; route names must be unique"#,
            r#"spliced.toml:12:10: route[1].listen: 127.0.0.1:8080 is already the listen address of route[0] ("ghost"); give each route its own address or port"#,
            r#"spliced.toml:14:8: route[1].mode: expected a string, found an integer (3); write e.g. mode = "auto""#,
        ]
    );
}

#[test]
fn error_syntax() {
    assert_eq!(
        error("x = \n"),
        "spliced.toml:1:5: invalid TOML: invalid string; expected `\"`, `'`"
    );
    // Duplicate keys are a TOML error, reported by the parser.
    let e = error(&route_with("name = \"again\""));
    assert!(
        e.starts_with("spliced.toml:5:1: invalid TOML: duplicate key"),
        "{e}"
    );
}

#[test]
fn error_unreadable_file() {
    let errors = Config::load(Path::new("/nonexistent/dir/spliced.toml")).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors[0].to_string(),
        "/nonexistent/dir/spliced.toml: cannot read the configuration file: No such file or \
             directory (os error 2)"
    );
}

#[test]
fn load_reads_the_file() {
    let path =
        std::env::temp_dir().join(format!("spliced-config-test-{}.toml", std::process::id()));
    std::fs::write(&path, route_with("")).unwrap();
    let loaded = Config::load(&path);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(loaded.unwrap().routes[0].name, "web");
}

#[test]
fn error_unknown_keys() {
    assert_eq!(
        error(&top_with("grace_priod = \"1s\"")),
        "spliced.toml:1:1: grace_priod: unknown key; did you mean `grace_period`? valid \
             top-level keys are `mode`, `grace_period`, `send_buffer`, `max_connections`, \
             `max_buffered`, `max_buffered_total`, `control_socket`, `metrics`, `user`, `xdp`, \
             `xdp_mode`, `workers`, `pin_lanes`, [[route]] tables"
    );
    assert_eq!(
        error(&route_with("listne = \"x\"")),
        "spliced.toml:5:1: route[0].listne: unknown key; did you mean `listen`? valid \
             [[route]] keys are `name`, `listen`, `upstream`, `balance`, `health_check`, \
             `mode`, `interface`, `connect_timeout`, `max_buffered`, `max_connections`, \
             `idle_timeout`, `allow`, `deny`, `syn_rate`, `peek_timeout`, `proxy_protocol`, \
             `accept_proxy`, `match`"
    );
    assert_eq!(
        error(&route_with("timeout = \"1s\"")),
        "spliced.toml:5:1: route[0].timeout: unknown key; valid [[route]] keys are `name`, \
             `listen`, `upstream`, `balance`, `health_check`, `mode`, `interface`, \
             `connect_timeout`, `max_buffered`, `max_connections`, `idle_timeout`, `allow`, `deny`, \
             `syn_rate`, `peek_timeout`, `proxy_protocol`, `accept_proxy`, `match`"
    );
}

#[test]
fn error_mode() {
    assert_eq!(
        error(&route_with("mode = \"Sockmap\"")),
        "spliced.toml:5:8: route[0].mode: \"Sockmap\" is not a mode; use one of auto, \
             sockmap, splice, copy"
    );
    assert_eq!(
        error(&top_with("mode = true")),
        "spliced.toml:1:8: mode: expected a string, found a boolean (true); write e.g. mode = \
             \"auto\""
    );
}

#[test]
fn error_durations() {
    assert_eq!(
        error(&top_with("grace_period = 5")),
        "spliced.toml:1:16: grace_period: 5 has no unit; use a number with a unit, e.g. \"5s\" \
             or \"250ms\", e.g. \"5s\""
    );
    assert_eq!(
        error(&top_with("grace_period = 1.5")),
        "spliced.toml:1:16: grace_period: expected a duration, found a float (1.5); use a \
             number with a unit, e.g. \"5s\" or \"250ms\""
    );
    for bad in ["5", "5 s", "1.5s", "5sec", "s", "", "-1s", "1h30m"] {
        assert_eq!(
            error(&top_with(&format!("grace_period = \"{bad}\""))),
            format!(
                "spliced.toml:1:16: grace_period: {bad:?} is not a duration; use a number \
                     with a unit, e.g. \"5s\" or \"250ms\""
            )
        );
    }
    assert_eq!(
        error(&top_with("grace_period = \"99999999999999999999h\"")),
        "spliced.toml:1:16: grace_period: \"99999999999999999999h\" is not a duration; use a \
             number with a unit, e.g. \"5s\" or \"250ms\""
    );
    assert_eq!(
        error(&top_with("grace_period = \"18446744073709551615h\"")),
        "spliced.toml:1:16: grace_period: \"18446744073709551615h\" is too long; use a \
             number with a unit, e.g. \"5s\" or \"250ms\""
    );
}

#[test]
fn error_connect_timeout() {
    assert_eq!(
        error(&route_with("connect_timeout = \"0s\"")),
        "spliced.toml:5:19: route[0].connect_timeout: must be more than 0; e.g. \"5s\""
    );
    assert_eq!(
        error(&route_with("connect_timeout = \"61m\"")),
        "spliced.toml:5:19: route[0].connect_timeout: \"61m\" is longer than the limit of \
             1h; use at most \"1h\", e.g. \"5s\""
    );
    assert_eq!(
        error(&route_with("connect_timeout = 5")),
        "spliced.toml:5:19: route[0].connect_timeout: 5 has no unit; use a number with a \
             unit, e.g. \"5s\" or \"250ms\", e.g. \"5s\""
    );
}

#[test]
fn error_sizes() {
    let hint = "use a number of bytes or a binary unit, e.g. 4096, \"512KiB\", \"16MiB\" or \
                    \"1GiB\"";
    assert_eq!(
        error(&top_with("send_buffer = -1")),
        format!("spliced.toml:1:15: send_buffer: -1 is negative; {hint}")
    );
    assert_eq!(
        error(&top_with("send_buffer = 1.5")),
        format!("spliced.toml:1:15: send_buffer: expected a size, found a float (1.5); {hint}")
    );
    assert_eq!(
        error(&top_with("send_buffer = \"16MB\"")),
        format!(
            "spliced.toml:1:15: send_buffer: \"16MB\": write the binary unit \"16MiB\" \
                 (decimal units are ambiguous); {hint}"
        )
    );
    assert!(error(&top_with("send_buffer = \"512k\"")).contains("\"512KiB\""));
    assert!(error(&top_with("send_buffer = \"1G\"")).contains("\"1GiB\""));
    for bad in ["16 MiB", "MiB", "1.5MiB", "16mib", "lots"] {
        assert_eq!(
            error(&top_with(&format!("send_buffer = \"{bad}\""))),
            format!("spliced.toml:1:15: send_buffer: {bad:?} is not a size; {hint}")
        );
    }
    assert_eq!(
        error(&top_with("send_buffer = \"18446744073709551615GiB\"")),
        format!("spliced.toml:1:15: send_buffer: \"18446744073709551615GiB\" is too large; {hint}")
    );
    assert_eq!(
        error(&top_with("send_buffer = 1073741825")),
        "spliced.toml:1:15: send_buffer: 1073741825 is more than the maximum of 1GiB; use \
             e.g. \"16MiB\", or 0 for the kernel's autotuning"
    );
}

#[test]
fn error_max_connections() {
    assert_eq!(
        error(&top_with("max_connections = 0")),
        "spliced.toml:1:19: max_connections: 0 is out of range; use 1 to 100000000, e.g. \
             max_connections = 10000"
    );
    assert!(error(&top_with("max_connections = -5")).contains("-5 is out of range"));
    assert!(error(&top_with("max_connections = 100000001")).contains("out of range"));
    assert_eq!(
        error(&top_with("max_connections = \"10000\"")),
        "spliced.toml:1:19: max_connections: expected an integer, found a string; write e.g. \
             max_connections = 10000"
    );
}

#[test]
fn workers_default_to_one_per_core() {
    let config = load(&top_with("workers = 3"));
    assert_eq!((config.workers, config.worker_threads()), (Some(3), 3));
    let config = load(&route_with(""));
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(config.workers, None);
    assert_eq!(config.worker_threads(), cores);
    assert_eq!(
        error(&top_with("workers = 0")),
        "spliced.toml:1:11: workers: 0 is out of range; use 1 to 1024, e.g. workers = 2 (or \
             leave it out: one per core)"
    );
    assert!(error(&top_with("workers = 1025")).contains("1025 is out of range"));
    assert!(error(&top_with("workers = \"2\"")).contains("expected an integer, found a string"));
}

#[test]
fn lanes_are_pinned_unless_told_not_to() {
    assert!(load(&route_with("")).pin_lanes);
    assert!(!load(&top_with("pin_lanes = false")).pin_lanes);
    assert!(load(&top_with("pin_lanes = true")).pin_lanes);
    assert_eq!(
        error(&top_with("pin_lanes = \"no\"")),
        "spliced.toml:1:13: pin_lanes: expected true or false, found a string; write e.g. \
         pin_lanes = false"
    );
}

#[test]
fn error_no_routes() {
    let msg = "route: no routes; add at least one [[route]] table with name, listen and upstream";
    assert_eq!(error(""), format!("spliced.toml:1:1: {msg}"));
    assert_eq!(
        error("mode = \"copy\"\n"),
        format!("spliced.toml:1:1: {msg}")
    );
    assert_eq!(error("route = []\n"), format!("spliced.toml:1:9: {msg}"));
}

#[test]
fn error_route_shape() {
    assert_eq!(
        error("[route]\nname = \"a\"\n"),
        "spliced.toml:1:1: route: [route] is a single table; write [[route]] (two brackets) \
             before each route"
    );
    assert_eq!(
        error("route = \"a\"\n"),
        "spliced.toml:1:9: route: expected [[route]] tables, found a string; write each \
             route as a [[route]] table with name, listen and upstream"
    );
    assert_eq!(
        error("route = [[1]]\n"),
        "spliced.toml:1:10: route[0]: expected a table, found an array; write each route as \
             a [[route]] table"
    );
    assert_eq!(
        error("route = [true]\n"),
        "spliced.toml:1:10: route[0]: expected a table, found a boolean; write each route as \
             a [[route]] table"
    );
}

#[test]
fn error_missing_keys() {
    assert_eq!(
        errors("mode = \"copy\"\n\n[[route]]\nmode = \"copy\"\n"),
        vec![
            "spliced.toml:3:1: route[0].name: missing (required); add e.g. name = \"web\" to \
                 this [[route]]",
            "spliced.toml:3:1: route[0].listen: missing (required); add e.g. listen = \
                 \"127.0.0.1:8080\" to this [[route]]",
            "spliced.toml:3:1: route[0].upstream: missing (required); add e.g. upstream = \
                 \"10.0.0.2:80\" to this [[route]]",
        ]
    );
}

#[test]
fn error_route_names() {
    let name = |n: &str| {
        format!("[[route]]\nname = {n}\nlisten = \"127.0.0.1:1\"\nupstream = \"10.0.0.2:80\"\n")
    };
    assert_eq!(
        error(&name("\"my route\"")),
        "spliced.toml:2:8: route[0].name: \"my route\" contains ' '; a route name may only \
             contain letters, digits, '_', '.' and '-'"
    );
    assert_eq!(
        error(&name("\"\"")),
        "spliced.toml:2:8: route[0].name: the name is empty; use letters, digits, '_', '.' \
             and '-', e.g. \"web\""
    );
    assert_eq!(
        error(&name("7")),
        "spliced.toml:2:8: route[0].name: expected a string, found an integer (7); write e.g. \
             name = \"web\""
    );
    // Uniqueness is checked even when another key of the route is wrong.
    let text = "[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"10.0.0.2:80\"\n\
                    [[route]]\nname = \"a\"\nlisten = \"127.0.0.1:2\"\nupstream = \"bad:0\"\n";
    assert_eq!(
        errors(text),
        vec![
            "spliced.toml:6:8: route[1].name: \"a\" is already the name of route[0]; route \
                 names must be unique",
            "spliced.toml:8:12: route[1].upstream: \"bad:0\": port 0 is not a valid upstream \
                 port; use 1 to 65535 (port 0 only means \"any free port\" in a listen address)",
        ]
    );
}

#[test]
fn error_listen() {
    let listen = |l: &str| {
        format!("[[route]]\nname = \"a\"\nlisten = \"{l}\"\nupstream = \"10.0.0.2:80\"\n")
    };
    assert_eq!(
        error(&listen("example.com:80")),
        "spliced.toml:3:10: route[0].listen: \"example.com:80\": listen addresses must be IP \
             literals, not host names; write e.g. \"127.0.0.1:80\" or \"[::]:80\""
    );
    assert_eq!(
        error(&listen("[fe80::1%nosuchif0]:80")),
        "spliced.toml:3:10: route[0].listen: interface \"nosuchif0\" (the zone of \
             \"[fe80::1%nosuchif0]:80\") does not exist on this machine; fix the name or create \
             the interface first (ip link shows the interfaces)"
    );
    assert_eq!(
        error("[[route]]\nname = \"a\"\nlisten = 8080\nupstream = \"10.0.0.2:80\"\n"),
        "spliced.toml:3:10: route[0].listen: expected a string, found an integer (8080); \
             write e.g. listen = \"127.0.0.1:8080\""
    );
}

#[test]
fn error_listen_conflicts() {
    let two = |a: &str, b: &str| {
        format!(
            "[[route]]\nname = \"a\"\nlisten = \"{a}\"\nupstream = \"10.0.0.2:80\"\n\
                 [[route]]\nname = \"b\"\nlisten = \"{b}\"\nupstream = \"10.0.0.2:80\"\n"
        )
    };
    assert_eq!(
        error(&two("[::1]:80", "[0:0::1]:80")),
        "spliced.toml:7:10: route[1].listen: [::1]:80 is already the listen address of \
             route[0] (\"a\"); give each route its own address or port"
    );
    assert_eq!(
        error(&two("127.0.0.1:80", "0.0.0.0:80")),
        "spliced.toml:7:10: route[1].listen: 0.0.0.0:80 overlaps 127.0.0.1:80 of route[0] \
             (\"a\"): a wildcard address (0.0.0.0 or [::]) takes the port on every address; give \
             each route its own port"
    );
    assert!(error(&two("[::]:80", "10.0.0.1:80")).contains("overlaps [::]:80"));
    assert!(error(&two("[::]:80", "[::1]:80")).contains("overlaps"));
    // An IPv4 wildcard leaves IPv6 addresses free.
    load(&two("0.0.0.0:80", "[::1]:80"));
}

#[test]
fn error_upstream() {
    let upstream = |u: &str| {
        format!("[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"{u}\"\n")
    };
    assert_eq!(
        error(&upstream("[fe80::1%nosuchif0]:2368")),
        "spliced.toml:4:12: route[0].upstream: interface \"nosuchif0\" (the zone of \
             \"[fe80::1%nosuchif0]:2368\") does not exist on this machine; fix the name or create \
             the interface first (ip link shows the interfaces)"
    );
    assert_eq!(
        error(&upstream("10.0.0.1%eth0:80")),
        "spliced.toml:4:12: route[0].upstream: \"10.0.0.1%eth0:80\": a zone (\"%eth0\") only \
             applies to IPv6 link-local addresses, not IPv4; remove it: write \"10.0.0.1:80\""
    );
    // A zone index is checked when the address is resolved, not here.
    load(&upstream("[fe80::1%4000000000]:2368"));
}

#[test]
fn error_interface() {
    assert_eq!(
        error(&route_with("interface = \"nosuchif0\"")),
        "spliced.toml:5:13: route[0].interface: interface \"nosuchif0\" does not exist on \
             this machine; fix the name or create the interface first (ip link shows the \
             interfaces)"
    );
    assert_eq!(
        error(&route_with("interface = \"a/b\"")),
        "spliced.toml:5:13: route[0].interface: interface name \"a/b\" contains '/', which \
             Linux interface names cannot contain (ip link lists the interfaces)"
    );
    assert_eq!(
        error(&route_with("interface = \"\"")),
        "spliced.toml:5:13: route[0].interface: the interface name is empty; name an \
             interface, e.g. \"eth0\" (ip link lists them)"
    );
    assert_eq!(
        error(&route_with("interface = [\"lo\"]")),
        "spliced.toml:5:13: route[0].interface: expected a string, found an array; write e.g. \
             interface = \"eth0\""
    );
}

#[test]
fn check_zone_messages() {
    assert!(check_zone(&"[fe80::1%lo]:80".parse().unwrap()).is_ok());
    assert!(check_zone(&"[fe80::1%7]:80".parse().unwrap()).is_ok());
    assert!(check_zone(&"10.0.0.1:80".parse().unwrap()).is_ok());
    assert_eq!(
        check_zone(&"[fe80::1%nosuchif0]:80".parse().unwrap()).unwrap_err(),
        "interface \"nosuchif0\" (the zone of \"[fe80::1%nosuchif0]:80\") does not exist on \
             this machine; fix the name or create the interface first (ip link shows the \
             interfaces)"
    );
}

#[test]
fn mode_names() {
    assert_eq!(
        Mode::ALL.map(Mode::as_str),
        ["auto", "sockmap", "splice", "copy"]
    );
    assert_eq!(Mode::Sockmap.to_string(), "sockmap");
    assert_eq!(EX_USAGE, 64);
}

#[test]
fn max_buffered_defaults_and_overrides() {
    let config = load(&route_with(""));
    assert_eq!(config.routes[0].max_buffered, DEFAULT_MAX_BUFFERED);
    assert_eq!(config.max_buffered_total, DEFAULT_MAX_BUFFERED_TOTAL);
    let text = "max_buffered = \"8MiB\"\nmax_buffered_total = \"1GiB\"\n".to_owned()
        + &route_with("")
        + &route_with("max_buffered = \"64KiB\"")
            .replace("\"web\"", "\"two\"")
            .replace("127.0.0.1:8080", "127.0.0.1:8081");
    let config = load(&text);
    assert_eq!(config.max_buffered_total, 1 << 30);
    assert_eq!(config.routes[0].max_buffered, 8 << 20);
    assert_eq!(config.routes[1].max_buffered, 64 << 10);
    assert_eq!(
        load(&route_with("max_buffered = 1048576")).routes[0].max_buffered,
        1 << 20
    );
}

#[test]
fn error_max_buffered() {
    assert_eq!(
        error(&top_with("max_buffered = \"4KiB\"")),
        "spliced.toml:1:16: max_buffered: \"4KiB\" is out of range; use 64KiB to 1GiB, e.g. \
             max_buffered = \"16MiB\""
    );
    assert_eq!(
        error(&route_with("max_buffered = \"2GiB\"")),
        "spliced.toml:5:16: route[0].max_buffered: \"2GiB\" is out of range; use 64KiB to \
             1GiB, e.g. max_buffered = \"16MiB\""
    );
    assert_eq!(
        error(&top_with("max_buffered_total = \"65GiB\"")),
        "spliced.toml:1:22: max_buffered_total: \"65GiB\" is out of range; use 64KiB to \
             64GiB, e.g. max_buffered_total = \"512MiB\""
    );
    assert_eq!(
        error(&top_with("max_buffered_total = \"1MiB\"")),
        "spliced.toml:1:22: max_buffered_total: 1MiB is less than the largest max_buffered \
             (16MiB); raise max_buffered_total to at least 16MiB or lower max_buffered"
    );
    assert_eq!(
        error(&top_with("max_buffered = \"1GiB\"")),
        "spliced.toml:1:16: max_buffered: 512MiB is less than the largest max_buffered \
             (1GiB); raise max_buffered_total to at least 1GiB or lower max_buffered"
    );
}

#[test]
fn route_limits_and_timeouts() {
    let config = load(&route_with(""));
    assert_eq!(config.routes[0].max_connections, None);
    assert_eq!(config.routes[0].idle_timeout, None);
    let config = load(&route_with("max_connections = 3\nidle_timeout = \"90s\""));
    assert_eq!(config.routes[0].max_connections, Some(3));
    assert_eq!(config.routes[0].idle_timeout, Some(Duration::from_secs(90)));
    assert_eq!(
        load(&route_with("idle_timeout = \"168h\"")).routes[0].idle_timeout,
        Some(MAX_IDLE_TIMEOUT)
    );
}

#[test]
fn error_route_max_connections() {
    assert_eq!(
        error(&route_with("max_connections = 0")),
        "spliced.toml:5:19: route[0].max_connections: 0 is out of range; use 1 to 100000000, \
             e.g. max_connections = 10000"
    );
    assert_eq!(
        error(&route_with("max_connections = \"5\"")),
        "spliced.toml:5:19: route[0].max_connections: expected an integer, found a string; \
             write e.g. max_connections = 10000"
    );
}

#[test]
fn error_idle_timeout() {
    assert_eq!(
        error(&route_with("idle_timeout = \"0s\"")),
        "spliced.toml:5:16: route[0].idle_timeout: must be more than 0; e.g. \"10m\" (leave \
             the key out for no idle timeout)"
    );
    assert_eq!(
        error(&route_with("idle_timeout = \"169h\"")),
        "spliced.toml:5:16: route[0].idle_timeout: \"169h\" is longer than the limit of 168h \
             (a week); use at most \"168h\", or leave the key out for no idle timeout"
    );
    assert_eq!(
        error(&route_with("idle_timeout = 60")),
        "spliced.toml:5:16: route[0].idle_timeout: 60 has no unit; use a number with a unit, \
             e.g. \"5s\" or \"250ms\", e.g. \"60s\""
    );
}

#[test]
fn control_socket_and_metrics() {
    let config = load(&route_with(""));
    assert_eq!(
        config.control_socket,
        std::path::PathBuf::from(DEFAULT_CONTROL_SOCKET)
    );
    assert!(config.metrics.is_none(), "metrics are off by default");
    let config = load(&top_with(
        "control_socket = \"/tmp/s.sock\"\nmetrics = \"[::1]:9180\"",
    ));
    assert_eq!(
        config.control_socket,
        std::path::PathBuf::from("/tmp/s.sock")
    );
    assert_eq!(config.metrics.unwrap().to_string(), "[::1]:9180");
}

#[test]
fn error_control_socket() {
    assert_eq!(
        error(&top_with("control_socket = \"run/s.sock\"")),
        "spliced.toml:1:18: control_socket: \"run/s.sock\" is not an absolute path; write \
             e.g. \"/run/spliced/control.sock\""
    );
    let long = format!("/{}", "a".repeat(107));
    assert_eq!(
        error(&top_with(&format!("control_socket = \"{long}\""))),
        format!(
            "spliced.toml:1:18: control_socket: \"{long}\" cannot name a Unix socket (a file \
                 path of at most 107 bytes, no NUL); write e.g. \"/run/spliced/control.sock\""
        )
    );
    assert_eq!(
        error(&top_with("control_socket = 1")),
        "spliced.toml:1:18: control_socket: expected a string, found an integer (1); write \
             e.g. control_socket = \"/run/spliced/control.sock\""
    );
}

#[test]
fn error_metrics() {
    assert_eq!(
        error(&top_with("metrics = \"localhost:9180\"")),
        "spliced.toml:1:11: metrics: \"localhost:9180\": listen addresses must be IP \
             literals, not host names; write e.g. \"127.0.0.1:9180\" or \"[::1]:9180\""
    );
    assert_eq!(
        error(&top_with("metrics = true")),
        "spliced.toml:1:11: metrics: expected a string, found a boolean (true); write e.g. \
             metrics = \"127.0.0.1:9180\""
    );
}

#[test]
fn user_key() {
    assert_eq!(load(&route_with("")).user, None, "stays root by default");
    assert_eq!(
        load(&top_with("user = \"nobody\"")).user.as_deref(),
        Some("nobody")
    );
    assert_eq!(
        error(&top_with("user = \"no-such-user-spliced\"")),
        "spliced.toml:1:8: user: user \"no-such-user-spliced\" does not exist on this \
             machine; create it (e.g. useradd --system --no-create-home --shell \
             /usr/sbin/nologin no-such-user-spliced) or remove the key to stay root"
    );
    assert_eq!(
        error(&top_with("user = 0")),
        "spliced.toml:1:8: user: expected a string, found an integer (0); write e.g. user = \
             \"spliced\""
    );
}

#[test]
fn accept_proxy_lists_trusted_prefixes() {
    let config = load(&route_with(
        "accept_proxy = [\"198.51.100.0/24\", \"2001:db8::/32\", \"203.0.113.9\"]",
    ));
    let route = &config.routes[0];
    let list: Vec<String> = route.accept_proxy.iter().map(|p| p.to_string()).collect();
    assert_eq!(list, ["198.51.100.0/24", "2001:db8::/32", "203.0.113.9/32"]);
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert!(route.trusts(ip("198.51.100.77")));
    // An IPv4 client of a [::] listener arrives IPv4-mapped.
    assert!(route.trusts(ip("::ffff:198.51.100.77")));
    assert!(route.trusts(ip("2001:db8:5::1")));
    assert!(route.trusts(ip("203.0.113.9")));
    assert!(!route.trusts(ip("203.0.113.10")));
    assert!(!route.trusts(ip("::ffff:192.0.2.1")));
    assert!(!route.trusts(ip("2001:db9::1")));
    assert!(!load(&route_with("")).routes[0].trusts(ip("198.51.100.1")));
    let listed = describe_route(route);
    assert!(
        listed.contains(
            "  accept_proxy 198.51.100.0/24, 2001:db8::/32, 203.0.113.9/32: a PROXY v1/v2 header \
             required from these sources within 5s\n"
        ),
        "{listed}"
    );
}

#[test]
fn error_accept_proxy() {
    assert_eq!(
        error(&route_with(
            "accept_proxy = [\"198.51.100.0/24\", \"198.51.100.1/24\"]"
        )),
        "spliced.toml:5:36: route[0].accept_proxy: 198.51.100.1/24 has bits set below the /24 \
         prefix: write 198.51.100.0/24"
    );
    assert_eq!(
        error(&route_with("accept_proxy = [\"::ffff:198.51.100.0/120\"]")),
        "spliced.toml:5:17: route[0].accept_proxy: ::ffff:198.51.100.0/120 is an IPv4-mapped \
         IPv6 prefix: write it as IPv4 (198.51.100.0/24)"
    );
    assert_eq!(
        error(&route_with("accept_proxy = [\"front.example\"]")),
        "spliced.toml:5:17: route[0].accept_proxy: \"front.example\" is not an address or a \
         prefix (write 198.51.100.0/24 or 2001:db8::/32)"
    );
    assert_eq!(
        error(&route_with("accept_proxy = []")),
        "spliced.toml:5:16: route[0].accept_proxy: an empty list trusts no source; remove \
         `accept_proxy`, or list the prefixes of the front proxies that send PROXY headers"
    );
    assert_eq!(
        error(&route_with("accept_proxy = \"198.51.100.0/24\"")),
        "spliced.toml:5:16: route[0].accept_proxy: expected a list of strings, found a string"
    );
}
