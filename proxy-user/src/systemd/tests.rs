use super::*;

#[test]
fn notify_without_a_manager_sends_nothing() {
    // The unit tests never run under a service manager's NOTIFY_SOCKET.
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        assert!(!notify("READY=1").unwrap());
    }
}

#[test]
fn reloading_carries_the_monotonic_time() {
    let m = reloading_message();
    let usec: u64 = m
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(usec > 0);
}

#[test]
fn only_listening_tcp_sockets_are_taken() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    assert!(check_listening_tcp(&l).is_ok());
    let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    assert_eq!(
        check_listening_tcp(&c).unwrap_err().to_string(),
        "not listening (Accept=yes is not supported; use Accept=no)"
    );
    let u = UnixDatagram::unbound().unwrap();
    assert!(check_listening_tcp(&u)
        .unwrap_err()
        .to_string()
        .starts_with("not a TCP socket"));
}
