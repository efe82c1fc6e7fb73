use super::*;

#[test]
fn lookup_users() {
    let root = lookup("root").unwrap();
    assert_eq!((root.uid, root.gid), (0, 0));
    assert_eq!(
        lookup("no-such-user-spliced").unwrap_err().to_string(),
        "user \"no-such-user-spliced\" does not exist on this machine; create it (e.g. \
         useradd --system --no-create-home --shell /usr/sbin/nologin no-such-user-spliced) \
         or remove the key to stay root"
    );
}

#[test]
fn status_lines() {
    let text =
        "Name:\tspliced\nUid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\n\
                CapInh:\t0000000000000000\nCapPrm:\t0000000000001400\nCapEff:\t0000000000001400\n\
                CapBnd:\t0000000000001400\n";
    let creds = parse_status(text).unwrap();
    assert_eq!(creds.uids, [65534; 4]);
    assert_eq!(creds.cap_eff, KEEP);
    assert_eq!(KEEP, 0x1400);
    assert!(parse_status("Name:\tx\n").is_none());
    assert_eq!(names(KEEP), "CAP_NET_BIND_SERVICE, CAP_NET_ADMIN");
    assert_eq!(
        names(KEEP | 1 << CAP_BPF),
        "CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_BPF"
    );
}

#[test]
fn bpf_trial_leaves_this_thread_alone() {
    let before = read_caps().unwrap();
    let needed = bpf_needs_cap();
    assert_eq!(
        read_caps().unwrap(),
        before,
        "the trial ran in its own thread"
    );
    // Linux 6.5 moved the unprivileged check into map creation and program loading.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap(), v.next().unwrap());
    if before.0 & (1 << CAP_BPF) != 0 && (major, minor) >= (6, 5) {
        assert!(
            !needed,
            "{release}: an existing map's lookup needs no CAP_BPF"
        );
    }
}
