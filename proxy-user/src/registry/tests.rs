use super::*;

#[test]
fn failure_labels_are_unique_and_indexed() {
    for (i, f) in Failure::ALL.iter().enumerate() {
        assert_eq!(*f as usize, i);
    }
    let mut labels: Vec<&str> = Failure::ALL.iter().map(|f| f.as_str()).collect();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), Failure::ALL.len());
}

#[test]
fn entries_leave_when_dropped() {
    let registry = Registry::default();
    let a = registry.add("r", "127.0.0.1:1".parse().unwrap());
    let b = registry.add("r", "127.0.0.1:2".parse().unwrap());
    assert_eq!(registry.samples().len(), 2);
    drop(a);
    let left = registry.samples();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].client.port(), 2);
    assert!(left[0].upstream.is_none() && left[0].path.is_none());
    drop(b);
    assert!(registry.samples().is_empty());
}

#[test]
fn a_proxied_connection_is_its_headers_client_via_the_front() {
    let registry = Registry::default();
    let entry = registry.add("r", "[::ffff:198.51.100.2]:40000".parse().unwrap());
    let before = &registry.samples()[0];
    assert_eq!(before.client.to_string(), "[::ffff:198.51.100.2]:40000");
    assert!(before.via.is_none());
    entry.conn.proxied("203.0.113.7:5555".parse().unwrap());
    let after = &registry.samples()[0];
    assert_eq!(after.client.to_string(), "203.0.113.7:5555");
    // The front as its prefix matched it: IPv4, not IPv4-mapped.
    assert_eq!(after.via.unwrap().to_string(), "198.51.100.2:40000");
}

#[test]
fn established_connection_reads_tcp_info() {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, peer) = listener.accept().unwrap();
    let registry = Registry::default();
    let entry = registry.add("r", peer);
    entry.conn.established(
        &server,
        &client,
        listener.local_addr().unwrap(),
        DataPath::Copy,
    );
    client.write_all(b"hello").unwrap();
    // The loopback delivery is synchronous, but allow the softirq a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = &registry.samples()[0];
        if s.bytes_up == 5 {
            assert_eq!(s.path, Some(DataPath::Copy));
            assert!(s.idle <= s.age);
            break;
        }
        assert!(Instant::now() < deadline, "{s:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (at most 5 s) until `registry`'s first connection shows `bytes` up.
fn wait_bytes_up(registry: &Registry, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while registry.samples()[0].bytes_up != bytes {
        assert!(Instant::now() < deadline, "{:?}", registry.samples()[0]);
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_descriptor_number_naming_another_socket_is_not_read() {
    use std::{io::Write, os::fd::AsRawFd};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    let (server, peer) = listener.accept().unwrap();
    let registry = Registry::default();
    let entry = registry.add("r", peer);
    entry
        .conn
        .established(&server, &client, addr, DataPath::Copy);
    client.write_all(b"hello").unwrap();
    wait_bytes_up(&registry, 5);
    // Another connection with 8 bytes received takes over the server socket's number, as a
    // new accept may once the data path closed it before the entry went.
    let mut other = std::net::TcpStream::connect(addr).unwrap();
    let (other_server, _) = listener.accept().unwrap();
    other.write_all(b"not ours").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sockopt::tcp_info(&other_server).unwrap().bytes_received != 8 {
        assert!(Instant::now() < deadline, "the other connection's 8 bytes");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: both numbers are open sockets this test owns; dup2 replaces one atomically.
    let r = unsafe { libc::dup2(other_server.as_raw_fd(), server.as_raw_fd()) };
    assert_eq!(r, server.as_raw_fd());
    let s = &registry.samples()[0];
    assert_eq!((s.bytes_up, s.bytes_down), (0, 0), "{s:?}");
}

#[test]
fn route_counters() {
    let registry = Registry::default();
    let r = registry.route("web");
    r.fail(Failure::NoUpstream);
    r.closed(DataPath::Splice, 10, 20);
    r.set_path(DataPath::Sockmap);
    let again = registry.route("web");
    assert_eq!(again.failed(Failure::NoUpstream), 1);
    assert_eq!(again.failed(Failure::Resolve), 0);
    assert_eq!(again.closed_on(DataPath::Splice), 1);
    assert_eq!(again.bytes_up.load(Ordering::Relaxed), 10);
    assert_eq!(again.path(), Some(DataPath::Sockmap));
    assert_eq!(registry.routes().len(), 1);
}
