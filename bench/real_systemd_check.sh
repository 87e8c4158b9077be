#!/bin/bash
# The sequence run under the namespaced systemd that bench/real_systemd.sh boots (NEEDS ROOT; read that
# file's header for what it touches). Installs the agent from a wheel of this checkout into the overlaid
# /opt and /etc, then: start (READY, STATUS=, watchdog), C-ECHO and a C-STORE of a small MR series with a
# result over MQTT, reload with a changed and with an invalid file, stop; prints the figures.
# Optional steps: WEDGE=1 (a test-only drop-in runs the agent with fault injection, as tests/test_lifecycle.py
# does, and wedges the job loop until systemd's watchdog restarts it), KILL=1 (the
# restart on a failure exit is shown with `systemctl kill -s SIGKILL` and the Restart= counter).
# usage: bench/real_systemd.sh boot && bench/real_systemd.sh check; bench/real_systemd.sh halt
set -uo pipefail
SCRATCH=${SCRATCH:-/work/runs/sysd}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-/work/main/.venv/bin/python}
DICOM_PORT=${DICOM_PORT:-41104}
MQTT_PORT=${MQTT_PORT:-41883}
B="$HERE/bench/real_systemd.sh"
ns() { "$B" sh "$@"; }
now() { date +%s.%N; }
say() { printf '\n== %s\n' "$*"; }
show() { ns systemctl show edge-agent -p "$1" --value; }
LOG=$SCRATCH/log; cd "$HERE" || exit 1
SINCE=$(date "+%Y-%m-%d %H:%M:%S")
mkdir -p "$LOG" "$SCRATCH/mr"

say "wheel and install"
rm -rf "$SCRATCH/wheel"
nice "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$SCRATCH/wheel" "$HERE" >/dev/null
WHEEL=$(ls "$SCRATCH"/wheel/edge_agent-*.whl)
ns nice -n 10 env PYTHONPATH="$HERE" "$PY" -c \
    "import sys; from agent.cli import main; sys.argv=['edge-agent']+sys.argv[1:]; sys.exit(main())" \
    install --python /usr/bin/python3 --source "$WHEEL" | tee "$LOG/install.txt"
ns systemd-sysusers /etc/sysusers.d/edge-agent.conf
ns systemd-tmpfiles --create /etc/tmpfiles.d/edge-agent.conf
ns mkdir -p /var/lib/edge-agent/models
ns cp -r "$HERE/models/mr-brain-cls" /var/lib/edge-agent/models/
TOML=$SCRATCH/agent.toml
write_toml() {  # $1: allowed_callers TOML list
    cat >"$TOML" <<EOF
device_id = "sysd-check"
[dicom]
port = $DICOM_PORT
bind = "127.0.0.1"
allowed_callers = $1
[mqtt]
host = "127.0.0.1"
port = $MQTT_PORT
[storage]
dir = "/var/lib/edge-agent"
min_free_mb = 50
[pipeline]
stable_age_s = 1.0
threads = 1
[models]
dir = "/var/lib/edge-agent/models"
[service]
watchdog_stall_s = ${STALL_S:-10}
EOF
    ns install -m 0640 -o root -g edge-agent "$TOML" /etc/edge-agent/agent.toml
}
write_toml '["STORESCU", "ECHOSCU"]'
ns /opt/edge-agent/venv/bin/edge-agent config check --config /etc/edge-agent/agent.toml
ns systemd-analyze security --no-pager edge-agent.service 2>/dev/null | tail -1 | tee "$LOG/exposure.txt" || true

say "mosquitto on 127.0.0.1:$MQTT_PORT and a subscriber"
if [ ! -f "$SCRATCH/mosquitto.pid" ]; then
    printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$MQTT_PORT" >"$SCRATCH/mosquitto.conf"
    /usr/sbin/mosquitto -c "$SCRATCH/mosquitto.conf" >"$LOG/mosquitto.log" 2>&1 &
    echo $! >"$SCRATCH/mosquitto.pid"; sleep 0.5
fi
mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -t 'edge/#' -v >"$LOG/mqtt.txt" 2>&1 &
SUB=$!

say "start (returns after READY=1)"
ns systemctl daemon-reload
ns systemctl reset-failed edge-agent 2>/dev/null
T0=$(now); ns systemctl start edge-agent; RC=$?; T1=$(now)
echo "systemctl start rc=$RC in $(echo "$T1 - $T0" | bc) s"
ns systemctl status edge-agent --no-pager -n 0 | head -12
ns systemctl show edge-agent -p ActiveState,SubState,StatusText,WatchdogUSec,NRestarts,MainPID,Type,NotifyAccess
M=$(ns systemctl show edge-agent -p ExecMainStartTimestampMonotonic,ActiveEnterTimestampMonotonic --value | tr '\n' ' ')
set -- $M; echo "exec to READY (ActiveEnter - ExecMainStart): $(echo "($2 - $1) / 1000000" | bc -l | cut -c1-5) s"
echo "C-ECHO right after start returned:"; echoscu -aec EDGE_AGENT 127.0.0.1 "$DICOM_PORT" && echo "  echo ok"

say "C-STORE of a small MR series, result over MQTT"
"$PY" - "$SCRATCH/mr" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from deploy.synth import make_mr_slice, write_mr_series
import shutil, time
out = Path(sys.argv[1]) / "s0"
shutil.rmtree(out, ignore_errors=True)  # a new series each run: the agent drops instances it already has
write_mr_series(make_mr_slice(777_100 + int(time.time()) % 100_000, difficulty="obvious"), out)
print(len(list(out.glob("*.dcm"))), "instances in", out)
EOF
: >"$LOG/mqtt.txt"; T2=$(now); storescu -aet STORESCU -aec EDGE_AGENT 127.0.0.1 "$DICOM_PORT" "$SCRATCH"/mr/s0/*.dcm; echo "storescu rc=$?"
for _ in $(seq 120); do grep -aq '/result' "$LOG/mqtt.txt" && break; sleep 1; done
tr -d '\000' <"$LOG/mqtt.txt" | grep -a '/result' | head -1 | cut -c1-300
echo "result $(echo "$(now) - $T2" | bc) s after the C-STORE began"

say "watchdog pings (WatchdogTimestamp advances)"
W1=$(show WatchdogTimestampMonotonic); sleep 35; W2=$(show WatchdogTimestampMonotonic)
echo "WatchdogTimestampMonotonic $W1 -> $W2 (advanced $(( (W2 - W1) / 1000000 )) s)"; show WatchdogTimestamp

say "reload: allow-list without ECHOSCU, then an invalid file"
write_toml '["STORESCU"]'
ns systemctl reload edge-agent; echo "reload rc=$?"; sleep 1
echoscu -aec EDGE_AGENT 127.0.0.1 "$DICOM_PORT" >/dev/null 2>&1 && echo "  ECHOSCU still accepted (WRONG)" || echo "  ECHOSCU now refused"
storescu -aet STORESCU -aec EDGE_AGENT 127.0.0.1 "$DICOM_PORT" "$(ls "$SCRATCH"/mr/s0/*.dcm | head -1)" && echo "  STORESCU still accepted"
printf 'device_id = "sysd-check"\n[dicom]\nport = "not a port"\n' >"$TOML"; ns install -m 0640 -o root -g edge-agent "$TOML" /etc/edge-agent/agent.toml
ns systemctl reload edge-agent; echo "reload (invalid) rc=$?"; sleep 1
ns systemctl show edge-agent -p ActiveState,SubState,MainPID,StatusText
ns journalctl -u edge-agent --since "$SINCE" --no-pager -o cat | grep -E 'config\.(reloaded|reload_failed)' | cut -c1-400
write_toml '["STORESCU", "ECHOSCU"]'; ns systemctl reload edge-agent
echoscu -aec EDGE_AGENT 127.0.0.1 "$DICOM_PORT" && echo "  ECHOSCU accepted again"

if [ "${WEDGE:-0}" = 1 ]; then
    say "watchdog restart of a wedged job loop (test-only drop-in: fault injection, as tests/test_lifecycle.py)"
    ns mkdir -p /etc/systemd/system/edge-agent.service.d /var/lib/edge-agent-test
    ns sh -c 'cat >/var/lib/edge-agent-test/run_faulty.py' <<'EOF'
import sys
from agent.core.config import load_config
from agent.core.log import setup_logging
from agent.service import Service
if __name__ == "__main__":  # the inference worker is spawned: it imports this file again
    cfg = load_config(sys.argv[1])
    setup_logging(cfg.logging.level, cfg.logging.format)
    sys.exit(Service(cfg, fault_injection=True, config_path=sys.argv[1]).run_forever())
EOF
    ns sh -c "printf '[Service]\nExecStart=\nExecStart=/opt/edge-agent/venv/bin/python /var/lib/edge-agent-test/run_faulty.py /etc/edge-agent/agent.toml\nEnvironment=EDGE_AGENT_FAULT_FILE=/var/lib/edge-agent/wedge\n' >/etc/systemd/system/edge-agent.service.d/zz-test-fault.conf"
    ns systemctl daemon-reload; ns systemctl restart edge-agent
    P0=$(show MainPID); R0=$(show NRestarts)
    ns sh -c 'echo wedge-jobs >/var/lib/edge-agent/wedge'; TW=$(now)
    for _ in $(seq 200); do [ "$(show MainPID)" != "$P0" ] && [ "$(show MainPID)" != 0 ] && break; sleep 1; done
    ns rm -f /var/lib/edge-agent/wedge
    echo "wedged at 0 s; new MainPID $(show MainPID) (was $P0) after $(echo "$(now) - $TW" | bc) s; NRestarts $R0 -> $(show NRestarts)"
    ns journalctl -u edge-agent --since "$SINCE" --no-pager -o cat | grep -E 'watchdog\.withheld|Watchdog timeout|Killing process|Main process exited|Scheduled restart' | tail -6 | cut -c1-300
    ns rm -f /etc/systemd/system/edge-agent.service.d/zz-test-fault.conf; ns systemctl daemon-reload
    for _ in $(seq 30); do [ "$(show ActiveState)" = active ] && break; sleep 1; done
    ns systemctl restart edge-agent
fi

if [ "${KILL:-0}" = 1 ]; then
    say "a failure exit restarts (Restart=on-failure)"
    R0=$(show NRestarts); P0=$(show MainPID)
    ns systemctl kill -s SIGKILL --kill-who=main edge-agent
    for _ in $(seq 40); do [ "$(show MainPID)" != "$P0" ] && [ "$(show ActiveState)" = active ] && break; sleep 1; done
    echo "after SIGKILL: NRestarts $R0 -> $(show NRestarts), state $(show ActiveState), MainPID $P0 -> $(show MainPID)"
fi

say "stop"
T3=$(now); ns systemctl stop edge-agent; RC=$?; T4=$(now)
echo "systemctl stop rc=$RC in $(echo "$T4 - $T3" | bc) s"
ns systemctl show edge-agent -p ActiveState,Result,ExecMainStatus,ExecMainCode,NRestarts
ns systemctl status edge-agent --no-pager -n 0 | grep -E 'Active|Main PID|Process'
kill "$SUB" 2>/dev/null
ns journalctl -u edge-agent --since "$SINCE" --no-pager -o short-monotonic >"$LOG/journal.txt"
grep -ciE 'permission denied|seccomp|EPERM|Traceback' "$LOG/journal.txt" | sed 's/^/journal lines with denial or traceback: /'
echo "journal in $LOG/journal.txt, MQTT in $LOG/mqtt.txt"
