use super::*;

fn address(s: &str) -> Result<Endpoint, Invalid> {
    s.parse::<Endpoint>().map_err(|e| Invalid(e.to_string()))
}

fn duration(v: &Item) -> Result<Duration, Invalid> {
    let s = v.as_str().ok_or("not a duration")?;
    let n: u64 = s
        .strip_suffix("ms")
        .ok_or("not ms")?
        .parse()
        .map_err(|_| "bad")?;
    Ok(Duration::from_millis(n))
}

const GRAMMAR: Grammar<'static> = Grammar {
    address: &address,
    duration: &duration,
};

/// Parses `v = TEXT` and hands the item to `f`; spans are offsets in that text.
fn with<T>(text: &str, f: impl FnOnce(&Item) -> T) -> T {
    let doc = toml_edit::ImDocument::parse(format!("v = {text}")).unwrap();
    f(doc.get("v").unwrap())
}

fn ok(text: &str) -> Vec<ServerSpec> {
    with(text, |i| servers(i, &GRAMMAR).unwrap())
}

/// (path, offset of the place in `text`, message) of each problem.
fn errors(text: &str) -> Vec<(String, Option<usize>, String)> {
    with(text, |i| servers(i, &GRAMMAR).unwrap_err())
        .into_iter()
        .map(|p| (p.at, p.span.map(|s| s.start - 4), p.message))
        .collect()
}

#[test]
fn the_three_forms() {
    let one = ok("\"10.0.0.1:80\"");
    assert_eq!(one, [ServerSpec::new("10.0.0.1:80".parse().unwrap())]);
    let list = ok("[\"10.0.0.1:80\", \"app.lxd:80\"]");
    assert_eq!(list.len(), 2);
    assert_eq!(list[1].address.to_string(), "app.lxd:80");
    let tables = ok(
        "[{ address = \"10.0.0.3:5432\", weight = 3 }, { address = \"10.0.0.4:5432\", \
         backup = true }, \"10.0.0.5:5432\"]",
    );
    assert_eq!(
        tables
            .iter()
            .map(|s| (s.weight, s.backup))
            .collect::<Vec<_>>(),
        [(3, false), (1, true), (1, false)]
    );
}

#[test]
fn arrays_of_tables_too() {
    let text = "[[upstream]]\naddress = \"10.0.0.1:80\"\nweight = 2\n[[upstream]]\naddress = \
                \"10.0.0.2:80\"\nbackup = true\n";
    let doc = toml_edit::ImDocument::parse(text).unwrap();
    let got = servers(doc.get("upstream").unwrap(), &GRAMMAR).unwrap();
    assert_eq!((got[0].weight, got[1].backup), (2, true));
}

#[test]
fn every_problem_with_its_path_and_place() {
    let text = "[\"bad\", { weight = 0, backup = 1, port = 80 }, 7]";
    assert_eq!(
        errors(text),
        [
            ("[0]".to_owned(), Some(1), address("bad").unwrap_err().0),
            (
                "[1].weight".to_owned(),
                Some(text.find("0,").unwrap()),
                "0 is out of range; use 1 to 256 (a share relative to the other servers)"
                    .to_owned()
            ),
            (
                "[1].backup".to_owned(),
                Some(text.find("1,").unwrap()),
                "expected true or false, found an integer (1); write e.g. backup = true".to_owned()
            ),
            (
                "[1].port".to_owned(),
                Some(text.find("port").unwrap()),
                "unknown key; valid keys of an upstream table are `address`, `weight`, `backup`"
                    .to_owned()
            ),
            (
                "[1]".to_owned(),
                Some(text.find('{').unwrap()),
                "the table has no address; add e.g. address = \"10.0.0.2:80\"".to_owned()
            ),
            (
                "[2]".to_owned(),
                Some(text.find('7').unwrap()),
                "expected an address or a table, found an integer (7); write \"10.0.0.2:80\" or \
                 { address = \"10.0.0.2:80\", weight = 2 }"
                    .to_owned()
            ),
        ]
    );
}

#[test]
fn shapes_that_cannot_work() {
    assert_eq!(
        errors("[]")[0].2,
        "the list is empty; write upstream = \"10.0.0.2:80\", a list of addresses, or a list of \
         tables such as { address = \"10.0.0.2:80\", weight = 2 }"
    );
    assert!(errors("80")[0]
        .2
        .starts_with("expected an address or a list, found an integer (80)"));
    let text = "[\"10.0.0.1:80\", { address = \"10.0.0.1:80\" }]";
    assert_eq!(
        errors(text),
        [(
            "[1]".to_owned(),
            Some(text.find('{').unwrap()),
            "\"10.0.0.1:80\" is already upstream[0]; list each server once (use weight to give \
             it a larger share)"
                .to_owned()
        )]
    );
    assert_eq!(
        errors("[{ address = \"10.0.0.1:80\", backup = true }]"),
        [(
            String::new(),
            None,
            "every server is a backup, so none would ever be a primary; remove backup = true \
             from at least one"
                .to_owned()
        )]
    );
}

#[test]
fn balance_names() {
    let b = |t: &str| with(t, balance);
    assert_eq!(b("\"source\""), Ok(Balance::Source));
    assert_eq!(b("\"leastconn\""), Ok(Balance::LeastConn));
    assert_eq!(
        b("\"random\"").unwrap_err(),
        "\"random\" is not a balance; use one of roundrobin, leastconn, source"
    );
    assert_eq!(
        b("1").unwrap_err(),
        "expected a string, found an integer (1); use one of roundrobin, leastconn, source"
    );
}

#[test]
fn health_check_defaults_and_bounds() {
    let hc = |t: &str| with(t, |i| health_check(i, &GRAMMAR));
    assert_eq!(hc("{}").unwrap(), HealthCheck::default());
    let set = hc("{ interval = \"500ms\", timeout = \"200ms\", rise = 1, fall = 5 }").unwrap();
    assert_eq!(
        (set.interval, set.timeout, set.rise, set.fall),
        (Duration::from_millis(500), Duration::from_millis(200), 1, 5)
    );
    let text = "{ interval = \"50ms\", rise = 0, fall = \"3\", every = 1 }";
    let problems = hc(text).unwrap_err();
    let at: Vec<(&str, usize)> = problems
        .iter()
        .map(|p| (p.at.as_str(), p.span.clone().unwrap().start - 4))
        .collect();
    assert_eq!(
        at,
        [
            (".interval", text.find("\"50ms").unwrap()),
            (".rise", text.find("0,").unwrap()),
            (".fall", text.find("\"3\"").unwrap()),
            (".every", text.find("every").unwrap()),
        ]
    );
    assert_eq!(
        problems[0].message,
        "\"50ms\" is out of range; use 100ms to 1h, e.g. interval = \"2s\""
    );
    let p = hc("{ interval = \"500ms\" }").unwrap_err();
    assert_eq!(p[0].at, ".interval");
    assert!(p[0]
        .message
        .starts_with("the timeout (1s) is longer than the interval (500ms)"));
    assert_eq!(
        hc("true").unwrap_err()[0].message,
        "expected a table, found a boolean (true); write e.g. health_check = { interval = \
         \"2s\", timeout = \"1s\", rise = 2, fall = 3 }"
    );
    // A [route.health_check] table is the same.
    let doc = toml_edit::ImDocument::parse("[hc]\nrise = 4\n").unwrap();
    assert_eq!(
        health_check(doc.get("hc").unwrap(), &GRAMMAR).unwrap().rise,
        4
    );
}
