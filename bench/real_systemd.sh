#!/bin/bash
# Boot a real systemd (the host's /lib/systemd/systemd) as PID 1 of a private PID, mount, cgroup, UTS and
# IPC namespace and run the installed edge-agent unit under it (docs/systemd.md, "Checked under a real
# systemd (merged daemon)"). For machines where systemd is not PID 1 (containers, CI runners).
#
# NEEDS ROOT (all capabilities). NOT a test: run it by hand on a throwaway or shared machine.
#
# What it touches on the host, and nothing else:
#   * $SCRATCH (default /work/runs/sysd): overlay upper/work folders, the wheel, logs;
#   * one cgroup, /sys/fs/cgroup/unified/edge-sysd-check (cgroup v2; removed by `halt`);
#   * the host's network namespace is shared: the agent listens on 127.0.0.1:$DICOM_PORT, Mosquitto on
#     127.0.0.1:$MQTT_PORT (started by `check`, outside the namespace).
# Inside the namespace /etc, /var and /opt are overlays on the host's (writes land in $SCRATCH/up), and
# /tmp, /run and /dev are fresh tmpfs (own device nodes), /sys is read-only with a private cgroup2 on
# /sys/fs/cgroup: systemd's boot-time tmpfiles, sysctl, udev, module loading and the like are masked in
# the overlaid /etc anyway, and the namespace is ended with SIGKILL (never a poweroff: systemd-shutdown
# must not remount anything). Never run systemd-tmpfiles --remove/--clean outside the namespace.
#
# usage: bench/real_systemd.sh boot | sh CMD... | check | halt
set -euo pipefail

SCRATCH=${SCRATCH:-/work/runs/sysd}
CG=/sys/fs/cgroup/unified/edge-sysd-check
DICOM_PORT=${DICOM_PORT:-41104}
MQTT_PORT=${MQTT_PORT:-41883}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-/work/main/.venv/bin/python}

pid1() { cat "$SCRATCH/pid1"; }
in_ns() { nsenter -t "$(pid1)" -m -p -u -i -C --wd=/ -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
          SYSTEMD_PAGER= SYSTEMD_COLORS=0 HOME=/root PIP_CACHE_DIR="$SCRATCH/pipcache" "$@"; }

inner() {  # runs as PID 1 of the new namespaces, then becomes systemd
    mount --make-rprivate /
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
    mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
    for d in etc var opt; do
        mount -t overlay overlay -o "lowerdir=/$d,upperdir=$SCRATCH/up/$d,workdir=$SCRATCH/wk/$d" "/$d"
    done
    mount -t proc proc /proc
    mount --bind /sys /sys && mount -o remount,bind,ro /sys
    mount -t cgroup2 cgroup2 /sys/fs/cgroup
    mount -t tmpfs -o mode=755,nosuid tmpfs /dev
    for n in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
        IFS=: read -r name ma mi <<<"$n"; mknod -m 666 "/dev/$name" c "$ma" "$mi"
    done
    mkdir -p /dev/pts /dev/shm
    mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts /dev/pts
    ln -s pts/ptmx /dev/ptmx; ln -s /proc/self/fd /dev/fd
    ln -s /proc/self/fd/0 /dev/stdin; ln -s /proc/self/fd/1 /dev/stdout; ln -s /proc/self/fd/2 /dev/stderr
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
    export container=edge-sysd-check
    exec /lib/systemd/systemd --system --unit=edge-check.target --log-target=journal --show-status=no
}

prepare_etc() {  # the overlaid /etc: a minimal boot target, and every host-touching unit masked
    local e=$SCRATCH/up/etc/systemd/system
    mkdir -p "$e"
    cat >"$e/edge-check.target" <<'EOF'
[Unit]
Description=edge-agent real-systemd check (minimal boot)
Requires=systemd-journald.socket systemd-journald.service
After=systemd-journald.socket systemd-journald.service
AllowIsolate=yes
EOF
    local u
    for u in $(ls /lib/systemd/system/{sysinit,sockets,timers,multi-user,getty,local-fs}.target.wants \
                  /etc/systemd/system/*.wants 2>/dev/null | grep -E '\.(service|socket|timer|mount|path|automount|target)$' | sort -u) \
             systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
             systemd-udev-trigger.service systemd-udev-settle.service systemd-tmpfiles-setup.service \
             systemd-tmpfiles-setup-dev.service systemd-tmpfiles-clean.timer systemd-tmpfiles-clean.service \
             systemd-sysctl.service systemd-modules-load.service systemd-timesyncd.service systemd-networkd.service \
             systemd-networkd-wait-online.service ifupdown-wait-online.service networking.service \
             systemd-remount-fs.service systemd-binfmt.service kmod-static-nodes.service systemd-random-seed.service \
             systemd-journald-audit.socket dev-mqueue.mount dev-hugepages.mount console-getty.service; do
        case $u in systemd-journald.service|systemd-journald.socket|systemd-journald-dev-log.socket|systemd-journal-flush.service) continue ;; esac
        ln -sfn /dev/null "$e/$u"
    done
    # the host's enabled services (mosquitto, databases...) must not start in here
    for w in /etc/systemd/system/*.wants; do rm -rf "$SCRATCH/up/etc/systemd/system/$(basename "$w")"; mkdir -p "$SCRATCH/up/etc/systemd/system/$(basename "$w")"; done
}

boot() {
    mkdir -p "$SCRATCH"/{up,wk}/{etc,var,opt} "$SCRATCH/log"
    prepare_etc
    mkdir -p "$CG"
    # the child joins the cgroup before unsharing, so systemd's cgroup namespace root is $CG
    setsid bash -c "echo \$\$ >$CG/cgroup.procs; exec unshare --pid --mount --cgroup --uts --ipc --fork \
        --propagation private -- bash $HERE/bench/real_systemd.sh _inner" \
        </dev/null >"$SCRATCH/log/systemd-console.log" 2>&1 &
    local u=$! t=0 p=""
    while [ $t -lt 100 ]; do
        p=$(pgrep -P "$u" 2>/dev/null | head -1 || true)
        if [ -n "$p" ] && [ "$(cat /proc/$p/comm 2>/dev/null)" = systemd ]; then break; fi
        p=""; sleep 0.2; t=$((t + 1))
    done
    [ -n "$p" ] || { echo "systemd did not start; see $SCRATCH/log/systemd-console.log" >&2; exit 1; }
    echo "$p" >"$SCRATCH/pid1"
    for _ in $(seq 50); do in_ns systemctl is-system-running >/dev/null 2>&1 && break
        [ "$(in_ns systemctl is-system-running 2>/dev/null || true)" = degraded ] && break; sleep 0.2; done
    echo "systemd booted: host pid $p, state $(in_ns systemctl is-system-running 2>/dev/null || true)"
}

halt() {
    if [ -f "$SCRATCH/pid1" ]; then kill -9 "$(pid1)" 2>/dev/null || true; rm -f "$SCRATCH/pid1"; fi
    sleep 1
    if [ -d "$CG" ]; then find "$CG" -depth -mindepth 1 -type d -exec rmdir {} \; 2>/dev/null || true; rmdir "$CG" 2>/dev/null || true; fi
    if [ -f "$SCRATCH/mosquitto.pid" ]; then kill "$(cat "$SCRATCH/mosquitto.pid")" 2>/dev/null || true; rm -f "$SCRATCH/mosquitto.pid"; fi
}

case ${1:-} in
    _inner) inner ;;
    boot) boot ;;
    sh) shift; in_ns "$@" ;;
    check) shift; exec bash "$HERE/bench/real_systemd_check.sh" "$@" ;;
    halt) halt ;;
    *) echo "usage: $0 boot | sh CMD... | check | halt" >&2; exit 2 ;;
esac
