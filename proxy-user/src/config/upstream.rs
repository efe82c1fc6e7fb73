//! The upstream keys of a route (and of a routing match): `upstream`, `balance` and
//! `health_check`. Their shapes are read by [`crate::upstream::parse`]; this module gives it the
//! file's value grammar and records each problem at its own place.
use std::time::Duration;

use toml_edit::Item;

use super::{
    document::{Entry, Errors},
    value, Problem,
};
use crate::{
    addr::Endpoint,
    upstream::{
        parse::{self, Grammar},
        UpstreamSpec,
    },
};

fn address(s: &str) -> Result<Endpoint, Problem> {
    value::upstream(s)
}

fn duration(item: &Item) -> Result<Duration, Problem> {
    value::duration(item)
}

/// Upstream addresses are checked like `upstream = "..."`; check durations like every duration.
const GRAMMAR: Grammar<'static> = Grammar {
    address: &address,
    duration: &duration,
};

/// Reads `entry` into `spec` if it is `upstream`, `balance` or `health_check`, recording every
/// problem under `key` (`route[0].upstream`, plus the path inside the value) at its own place.
/// `None` for any other key; else whether the value was valid.
pub(super) fn key(
    entry: &Entry,
    spec: &mut UpstreamSpec,
    key: &str,
    errors: &mut Errors,
) -> Option<bool> {
    let item = entry.item;
    let result = match entry.key {
        "upstream" => parse::servers(item, &GRAMMAR).map(|s| spec.servers = s),
        "health_check" => parse::health_check(item, &GRAMMAR).map(|h| spec.health_check = Some(h)),
        "balance" => parse::balance(item)
            .map(|b| spec.balance = b)
            .map_err(|message| {
                vec![parse::Problem {
                    at: String::new(),
                    span: None,
                    message: message.into(),
                }]
            }),
        _ => return None,
    };
    let Err(problems) = result else {
        return Some(true);
    };
    for p in &problems {
        let span = p.span.clone().unwrap_or_else(|| entry.value_span());
        errors.at(&span, &format!("{key}{}", p.at), p.message.clone());
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use crate::{upstream::Balance, Config};

    const ROUTE: &str = "[[route]]\nname = \"db\"\nlisten = \"127.0.0.1:5432\"\n";

    fn load(keys: &str) -> Result<Config, Vec<String>> {
        Config::from_toml(Path::new("spliced.toml"), &format!("{ROUTE}{keys}\n"))
            .map_err(|errors| errors.into_iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn several_upstreams() {
        let config = load(
            "upstream = [\n  { address = \"[fe80::3%lo]:5432\", weight = 3 },\n  \
             { address = \"db.lxd:5432\", backup = true },\n]\nbalance = \"source\"\n\
             health_check = { interval = \"500ms\", timeout = \"200ms\", rise = 1 }",
        )
        .unwrap();
        let up = &config.routes[0].upstream;
        assert_eq!(up.servers.len(), 2);
        assert_eq!((up.servers[0].weight, up.servers[1].backup), (3, true));
        assert_eq!(up.balance, Balance::Source);
        let hc = up.health_check.unwrap();
        assert_eq!(
            (hc.interval, hc.timeout, hc.rise, hc.fall),
            (Duration::from_millis(500), Duration::from_millis(200), 1, 3)
        );
        // A plain string is one server, round robin, no checks.
        let one = load("upstream = \"10.0.0.2:80\"").unwrap();
        let one = &one.routes[0].upstream;
        assert_eq!((one.servers.len(), one.health_check), (1, None));
    }

    #[test]
    fn each_problem_at_its_place() {
        assert_eq!(
            load(
                "upstream = [\n  \"10.0.0.2:80\",\n  { address = \"x\", weight = 0 },\n]\n\
                 balance = \"random\"\nhealth_check = { interval = \"1s\", rise = 0 }"
            )
            .unwrap_err(),
            [
                "spliced.toml:6:15: route[0].upstream[1].address: \"x\": missing port; write \
                 \"x:PORT\", e.g. \"x:80\"",
                "spliced.toml:6:29: route[0].upstream[1].weight: 0 is out of range; use 1 to 256 \
                 (a share relative to the other servers)",
                "spliced.toml:8:11: route[0].balance: \"random\" is not a balance; use one of \
                 roundrobin, leastconn, source",
                "spliced.toml:9:42: route[0].health_check.rise: 0 is out of range; use 1 to 100, \
                 e.g. rise = 2",
            ]
        );
        assert_eq!(
            load("upstream = []").unwrap_err(),
            [
                "spliced.toml:4:12: route[0].upstream: the list is empty; write upstream = \
              \"10.0.0.2:80\", a list of addresses, or a list of tables such as { address = \
              \"10.0.0.2:80\", weight = 2 }"
            ]
        );
    }
}
