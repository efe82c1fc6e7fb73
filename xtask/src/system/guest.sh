#!/bin/bash
# The system test, run inside the Debian guest by spliced-system-test.service once systemd (PID 1)
# reached multi-user.target. Every check prints one line on the console:
#   SPLICED-SYSTEM: ok NAME | SPLICED-SYSTEM: fail NAME: WHY | SPLICED-SYSTEM: value KEY VALUE
# and xtask fails the command unless every check it expects printed ok. The commands that the
# README's "Install" section shows are marked README.
set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0
CONF=/etc/spliced/spliced.toml
failures=0
say() { echo "SPLICED-SYSTEM: $*"; }
ok() { say "ok $1"; }
fail() {
    say "fail $1: $2"
    failures=$((failures + 1))
}
# check NAME FUNCTION: runs FUNCTION in a subshell (so `die` ends only it), at most 180 s; ok if
# it exits 0, else the last lines it printed are the reason. Its `value` lines are passed on.
check() {
    local name=$1 pid n=0 rc
    shift
    "$@" >/tmp/check.out 2>&1 &
    pid=$!
    while kill -0 $pid 2>/dev/null && [ $n -lt 1800 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    if kill -0 $pid 2>/dev/null; then
        kill -9 $pid
        wait $pid 2>/dev/null
        rc=timeout
    else
        wait $pid
        rc=$?
    fi
    grep "^SPLICED-SYSTEM: value " /tmp/check.out
    if [ "$rc" = 0 ]; then
        ok "$name"
    else
        grep -v "^SPLICED-SYSTEM: " /tmp/check.out | tail -n 15 | sed "s/^/SPLICED-SYSTEM: | /"
        journalctl -u spliced --no-pager -o cat -n 12 | sed "s/^/SPLICED-SYSTEM: journal | /"
        fail "$name" "exit $rc: $(grep -v '^SPLICED-SYSTEM: ' /tmp/check.out | tail -n 1)"
    fi
}
prop() { systemctl show -p "$1" --value spliced; }
die() {
    echo "$*"
    exit 1
}
sha() { sha256sum | cut -d' ' -f1; }

# The test upstreams: A serves a 24 MiB file, B answers "route b" (a file too: a forked shell
# under TCG can lose the race with the client's EOF).
head -c $((24 * 1024 * 1024)) /dev/urandom >/srv/blob
BLOB=$(sha </srv/blob)
echo "route b" >/srv/route-b
for u in a:7001:/srv/blob b:7002:/srv/route-b; do
    IFS=: read -r name port file <<<"$u"
    systemd-run -q --unit upstream-$name \
        socat TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork OPEN:$file,rdonly
done
# answer PORT: what 127.0.0.1:PORT sends, without closing our side first.
answer() { socat -T 10 -u TCP:127.0.0.1:$1 STDOUT; }
# get PORT [RATE]: the whole answer of 127.0.0.1:PORT through spliced, hashed; RATE limits reading.
get() {
    if [ -n "${2:-}" ]; then
        socat -u TCP:127.0.0.1:$1 STDOUT | pv -q -L "$2" | sha
    else
        socat -u TCP:127.0.0.1:$1 STDOUT | sha
    fi
}

install_package() {
    dpkg -i /root/spliced_*.deb || die "dpkg -i failed"          # README
    apt-get install -f -y --no-download || die "apt-get -f failed"
    id spliced || die "the package did not create the user spliced"
    [ "$(systemctl is-enabled spliced)" = disabled ] || die "the package enabled the service"
    [ ! -d /usr/lib/debug/.build-id ] || die "debug info installed without spliced-dbgsym"
    say "value installed-binary-bytes $(stat -c %s /usr/bin/spliced)"
}
check install install_package

configure() {
    # README: edit the route in /etc/spliced/spliced.toml (here: the upstream).
    sed -i 's/^upstream = "127.0.0.1:2368"/upstream = "127.0.0.1:7001"/' $CONF
    grep -q '^upstream = "127.0.0.1:7001"' $CONF || die "the example configuration changed"
    spliced check --config $CONF                                  # README
}
check configure configure

enable_now() {
    systemctl enable --now spliced || die "enable --now failed"   # README
    [ "$(systemctl is-active spliced)" = active ] || die "not active"
    [ "$(systemctl is-enabled spliced)" = enabled ] || die "not enabled"
    [ "$(prop Type)" = notify ] || die "Type is $(prop Type)"
    # Type=notify: active only once READY=1 came, with the daemon's STATUS= text.
    [ "$(prop StatusText)" = "forwarding 1 route(s)" ] || die "StatusText: $(prop StatusText)"
    [ "$(prop NRestarts)" = 0 ] || die "restarted"
    say "value status-text $(prop StatusText)"
    spliced status || die "spliced status failed"                # README
}
check enable-now enable_now

transfer() {
    local got
    got=$(get 8080)
    [ "$got" = "$BLOB" ] || die "SHA-256 $got, upstream has $BLOB"
}
check transfer-sha256 transfer

reload_during_transfer() {
    local pid before got
    pid=$(prop MainPID)
    # About 6 s of transfer, limited by the reader.
    get 8080 4m >/tmp/during &
    before=$!
    sleep 1
    cat >>$CONF <<'EOF'

[[route]]
name = "b"
listen = "127.0.0.1:8081"
upstream = "127.0.0.1:7002"
EOF
    systemctl reload spliced || die "reload failed"
    [ "$(prop MainPID)" = "$pid" ] || die "reload restarted the daemon"
    [ "$(prop StatusText)" = "configuration reloaded" ] || die "StatusText: $(prop StatusText)"
    got=$(answer 8081)
    [ "$got" = "route b" ] || die "the new route answered '$got'"
    kill -0 $before 2>/dev/null || die "the transfer had ended before the reload"
    wait $before
    got=$(cat /tmp/during)
    [ "$got" = "$BLOB" ] || die "the transfer across the reload arrived as $got"
}
check reload-during-transfer reload_during_transfer

bad_reload() {
    cp $CONF /tmp/good.toml
    trap 'cp /tmp/good.toml $CONF' EXIT
    echo 'max_connections = "many"' >>$CONF
    ! spliced check --config $CONF || die "check accepted the bad file"
    systemctl reload spliced || die "systemctl reload failed"
    [ "$(systemctl is-active spliced)" = active ] || die "not active after a bad reload"
    [ "$(prop StatusText)" = "reload failed; running the previous configuration" ] ||
        die "StatusText: $(prop StatusText)"
    journalctl -u spliced --no-pager | grep -q "still running the previous configuration" ||
        die "no reload error in the journal"
    [ "$(get 8080)" = "$BLOB" ] || die "route example broken after the bad reload"
    [ "$(answer 8081)" = "route b" ] || die "route b gone"
    # ExecStartPre runs `spliced check`: a restart with the bad file fails before the daemon.
    ! systemctl restart spliced || die "restart with a bad file succeeded"
    journalctl -u spliced --no-pager | grep -q "spliced.toml:.*max_connections" ||
        die "the journal does not name the bad key"
    [ "$(prop ExecMainStatus)" != 0 ] || true
    cp /tmp/good.toml $CONF
    systemctl reset-failed spliced
    systemctl start spliced || die "start with the good file failed"
    [ "$(get 8080)" = "$BLOB" ] || die "route example broken after the restart"
}
check bad-config-reload bad_reload

hardening() {
    local pid want status uid caps
    pid=$(prop MainPID)
    for kv in NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes PrivateTmp=yes \
        PrivateDevices=yes ProtectKernelTunables=yes ProtectKernelModules=yes \
        ProtectControlGroups=yes RestrictNamespaces=yes MemoryDenyWriteExecute=yes \
        LockPersonality=yes RestrictRealtime=yes RestrictSUIDSGID=yes ProtectClock=yes \
        ProtectHostname=yes ProtectKernelLogs=yes ProtectProc=invisible; do
        want=${kv#*=}
        [ "$(prop "${kv%%=*}")" = "$want" ] || die "${kv%%=*} is $(prop "${kv%%=*}"), want $want"
    done
    prop CapabilityBoundingSet | grep -q cap_bpf || die "bounding set: $(prop CapabilityBoundingSet)"
    prop RestrictAddressFamilies | grep -q AF_INET6 || die "address families"
    prop SystemCallFilter | grep -qw bpf || die "system call filter has no bpf"
    uid=$(id -u spliced)
    status=/proc/$pid/status
    grep -Eq "^Uid:\s+$uid\s+$uid\s+$uid\s+$uid$" $status || die "$(grep Uid $status)"
    grep -Eq "^NoNewPrivs:\s+1$" $status || die "no_new_privs not set"
    grep -Eq "^CapAmb:\s+0+$" $status || die "$(grep CapAmb $status)"
    # CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12) and, on kernels that check it for every
    # bpf() command, CAP_BPF (39): what the log line says was kept.
    caps=$(grep CapEff $status | awk '{print $2}')
    case "$caps" in
    0000000000001400) kept="CAP_NET_BIND_SERVICE, CAP_NET_ADMIN" ;;
    0000008000001400) kept="CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_BPF" ;;
    *) die "CapEff $caps" ;;
    esac
    grep -q "CapPrm:\s*$caps" $status || die "$(grep CapPrm $status)"
    journalctl -u spliced --no-pager | grep "running as user spliced" | tail -n 1 |
        grep -q "keeping only" || die "no privilege drop line"
    say "value capabilities $caps ($kept)"
    for task in /proc/$pid/task/*; do
        grep -q "CapEff:\s*$caps" $task/status || die "thread $task: $(grep CapEff $task/status)"
    done
    systemd-analyze security spliced --no-pager >/tmp/security || die "systemd-analyze failed"
    local score
    score=$(grep -o "Overall exposure level for spliced.service: [0-9.]* [A-Z]*" /tmp/security |
        awk '{print $6, $7}')
    [ -n "$score" ] || die "no exposure level: $(tail -n 2 /tmp/security)"
    say "value security $score"
    awk -v s="${score% *}" 'BEGIN { exit !(s <= 3.0) }' || die "exposure $score above 3.0"
}
check hardening hardening

journal() {
    journalctl -u spliced --no-pager >/tmp/journal
    grep -q "route example: listening on 127.0.0.1:8080, upstream 127.0.0.1:7001, data path" \
        /tmp/journal || die "no start-up data path line"
    say "value data-path $(grep -o 'route example: listening.*data path [a-z]*' /tmp/journal |
        tail -n 1 | awk '{print $NF}')"
    # Two cores: the route accepts on two lanes, steered (bookworm's 6.1 loads the program).
    grep -q "route example: accepting on 2 lanes, each connection on the lane" /tmp/journal ||
        die "route example does not accept on the lanes: $(grep -o \
            'route example: \(accepting on one socket\|the accept steering failed\).*' \
            /tmp/journal | tail -n 1)"
    if grep -q "sockmap unavailable" /tmp/journal; then
        say "value why-not-sockmap $(grep -o 'sockmap unavailable.*' /tmp/journal | tail -n 1)"
        die "the service fell back from sockmap (its probe passes on this kernel as root)"
    fi
    grep -q "connection closed route=example .*bytes_down=25165824 .*end=complete" /tmp/journal ||
        die "no per-connection line of a whole transfer"
    grep -q "connection closed route=b " /tmp/journal || die "no per-connection line of route b"
}
check journal journal

socket_activation() {
    cp $CONF /tmp/before-socket.toml
    # Back to the packaged unit and configuration, whatever happens.
    trap 'systemctl disable --now spliced.socket; rm -rf /etc/systemd/system/spliced.service.d \
        /etc/systemd/system/spliced.socket; cp /tmp/before-socket.toml $CONF;
        systemctl daemon-reload; systemctl reset-failed spliced; systemctl restart spliced' EXIT
    cp /usr/share/doc/spliced/examples/spliced.socket /etc/systemd/system/
    cat >>$CONF <<'EOF'

[[route]]
name = "web"
listen = "127.0.0.1:80"
upstream = "127.0.0.1:7002"
EOF
    # The daemon without CAP_NET_BIND_SERVICE: it cannot bind port 80 itself.
    mkdir -p /etc/systemd/system/spliced.service.d
    cat >/etc/systemd/system/spliced.service.d/no-bind.conf <<'EOF'
[Service]
CapabilityBoundingSet=
CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_SETUID CAP_SETGID CAP_SETPCAP CAP_CHOWN
Restart=no
EOF
    systemctl daemon-reload
    ! systemctl restart spliced || die "spliced bound port 80 without CAP_NET_BIND_SERVICE"
    journalctl -u spliced --no-pager | grep -q "127.0.0.1:80.*[Pp]ermission denied" ||
        die "no bind error in the journal"
    systemctl reset-failed spliced
    systemctl enable --now spliced.socket || die "enable spliced.socket failed"
    systemctl restart spliced || die "restart with the socket failed"
    journalctl -u spliced --no-pager | grep -q "route web: socket-activated" ||
        die "route web not socket-activated"
    [ "$(answer 80)" = "route b" ] || die "port 80 did not answer"
    ss -ltnp | grep ':80 ' | grep -q systemd || die "port 80 is not systemd's: $(ss -ltnp)"
    [ "$(get 8080)" = "$BLOB" ] || die "route example broken"
}
check socket-activation socket_activation

stop_drains() {
    local t0 t1 reader
    sed -i 's/^grace_period = .*/grace_period = "8s"/' $CONF
    systemctl reload spliced
    get 8080 6m >/tmp/draining &
    reader=$!
    sleep 1
    t0=$(date +%s%N)
    systemctl stop spliced || die "stop failed"
    t1=$(date +%s%N)
    wait $reader
    [ "$(cat /tmp/draining)" = "$BLOB" ] || die "the transfer during stop arrived as $(cat /tmp/draining)"
    say "value stop-ms $(((t1 - t0) / 1000000))"
    [ $(((t1 - t0) / 1000000)) -lt 10000 ] || die "stop took $(((t1 - t0) / 1000000)) ms"
    [ "$(prop Result)" = success ] || die "Result=$(prop Result)"
    journalctl -u spliced --no-pager | grep -q "SIGTERM: stopping" || die "no stop line"
}
check stop-drains stop_drains

remove_purge() {
    systemctl start spliced || die "start failed"
    apt-get remove -y spliced || die "remove failed"                 # README
    [ ! -e /usr/bin/spliced ] || die "binary left after remove"
    ! pgrep -x spliced >/dev/null || die "spliced still runs after remove"
    [ -f $CONF ] || die "remove deleted the conffile"
    dpkg -l spliced | grep -q '^rc' || die "not in state rc: $(dpkg -l spliced | tail -n 1)"
    apt-get purge -y spliced || die "purge failed"                   # README
    [ ! -e /etc/spliced ] || die "/etc/spliced left after purge"
    dpkg -l spliced 2>/dev/null | grep -q '^[a-z][a-z] ' && die "still known to dpkg"
    # What Debian policy lets a purge leave: the system user and group (never removed, their
    # files may remain elsewhere). Anything else named spliced is a leftover. The journal and
    # this test's own files are not the package's.
    local left
    left=$(find / -xdev \( -path /proc -o -path /sys -o -path /root -o -path /var/log/journal \
        -o -path /run/log \) -prune -o -name '*spliced*' ! -name 'spliced-system-test*' -print)
    [ -z "$left" ] || die "left after purge: $left"
    id spliced >/dev/null || die "the user was removed (policy: keep it)"
    say "value after-purge user spliced kept"
}
check remove-purge remove_purge

say "failures $failures"
say "done"
