use super::KernelVersion as V;

#[test]
fn kernel_versions() {
    assert_eq!(V::parse("6.18.0", "#1 SMP"), Some(V(6, 18, 0)));
    assert_eq!(V::parse("6.1.31-generic", ""), Some(V(6, 1, 31)));
    assert_eq!(
        V::parse("6.12.117+deb12-cloud-amd64", "#1 SMP Debian 6.12.117-1"),
        Some(V(6, 12, 117))
    );
    assert_eq!(
        V::parse(
            "6.1.0-56-cloud-amd64",
            "#1 SMP PREEMPT_DYNAMIC Debian 6.1.158-1 (2025-11-09)"
        ),
        Some(V(6, 1, 158))
    );
    assert_eq!(
        V::parse(
            "5.10.0-46-cloud-amd64",
            "#1 SMP Debian 5.10.262-1 (2026-07-31)"
        ),
        Some(V(5, 10, 262))
    );
    // A Debian string for another series is not ours.
    assert_eq!(
        V::parse("6.1.0-5-amd64", "#1 SMP Debian 6.0.12-1"),
        Some(V(6, 1, 0))
    );
    assert_eq!(V::parse("7.2", ""), Some(V(7, 2, 0)));
    assert_eq!(V::parse("linux", ""), None);
}

#[test]
fn tcp_read_skb_bugs_by_version() {
    for bad in [
        V(6, 0, 19),
        V(6, 1, 0),
        V(6, 1, 30),
        V(6, 2, 16),
        V(6, 3, 4),
    ] {
        let why = bad.known_bug().unwrap_or_else(|| panic!("{bad} passed"));
        assert!(why.contains("tcp_read_skb"), "{why}");
    }
    for good in [
        V(5, 10, 0),
        V(5, 15, 100),
        V(6, 1, 31),
        V(6, 1, 158),
        V(6, 3, 5),
        V(6, 4, 0),
        V(6, 12, 117),
        V(6, 18, 0),
        V(7, 2, 13),
    ] {
        assert_eq!(good.known_bug(), None, "{good}");
    }
}
