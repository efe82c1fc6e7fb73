use super::*;
use crate::addr::Endpoint;

fn route(name: &str, listen: &str) -> Route {
    Route::new(
        name,
        Endpoint::parse_listen(listen).unwrap(),
        "10.0.0.2:80".parse().unwrap(),
    )
}

#[test]
fn same_name_and_address_keeps_the_listener() {
    let old = [route("a", "127.0.0.1:1000"), route("b", "127.0.0.1:1001")];
    let new = [route("b", "127.0.0.1:1001"), route("a", "127.0.0.1:1000")];
    let p = plan(&old, &new);
    assert_eq!(p.reuse, vec![Some(1), Some(0)]);
    assert!(p.removed.is_empty());
}

#[test]
fn renamed_route_keeps_the_listener_of_its_address() {
    let old = [route("a", "127.0.0.1:1000")];
    let new = [route("z", "127.0.0.1:1000")];
    assert_eq!(plan(&old, &new).reuse, vec![Some(0)]);
}

#[test]
fn new_address_gets_a_new_listener_and_the_old_one_goes() {
    let old = [route("a", "127.0.0.1:1000")];
    let new = [route("a", "127.0.0.1:2000")];
    let p = plan(&old, &new);
    assert_eq!(p.reuse, vec![None]);
    assert_eq!(p.removed, vec![0]);
}

#[test]
fn port_zero_is_kept_only_under_the_same_name() {
    let old = [route("a", "127.0.0.1:0")];
    assert_eq!(
        plan(&old, &[route("a", "127.0.0.1:0")]).reuse,
        vec![Some(0)]
    );
    let p = plan(&old, &[route("b", "127.0.0.1:0")]);
    assert_eq!(p.reuse, vec![None]);
    assert_eq!(p.removed, vec![0]);
}

#[test]
fn same_name_is_preferred_over_an_earlier_route_of_the_same_address() {
    // Two old port-0 routes cannot share an address, but two of one port on different
    // hosts can: the name decides which new route keeps which.
    let old = [route("x", "127.0.0.1:1000"), route("y", "127.0.0.2:1000")];
    let new = [route("y", "127.0.0.2:1000"), route("x", "127.0.0.1:1000")];
    assert_eq!(plan(&old, &new).reuse, vec![Some(1), Some(0)]);
}

#[test]
fn each_old_listener_is_kept_once() {
    let old = [route("a", "127.0.0.1:1000")];
    let new = [route("a", "127.0.0.1:1000"), route("b", "127.0.0.1:1000")];
    let p = plan(&old, &new);
    assert_eq!(p.reuse, vec![Some(0), None]);
}

#[test]
fn start_only_keys_are_named_when_a_reload_changes_them() {
    let old = Config::new(vec![route("a", "127.0.0.1:1000")]);
    let mut new = old.clone();
    assert!(restart_only(&old, &new).is_empty());
    new.workers = Some(1);
    new.send_buffer = None;
    assert_eq!(restart_only(&old, &new), vec!["send_buffer", "workers"]);
}
