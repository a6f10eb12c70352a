#!/usr/bin/env bash
# make demo: the whole sync on this machine -- a seeded emulator (Salesforce org + Data Cloud over HTTPS on
# 127.0.0.1) and `airflow standalone` -- then one run of the DAG, its verify summary, and the UI left up.
#
#   bash include/scripts/demo.sh          start, run, wait; Ctrl-C stops everything
#   bash include/scripts/demo.sh stop     stop what a previous demo left running
#
# Environment: ROWS (default 200000), BAD_ROWS (50), PARTITIONS (10), PARTITION_KEY (account),
# AIRFLOW_PORT (8080), EMULATOR_PORT (8443, or a free port when taken), DEMO_TIMEOUT (seconds, 1800),
# EMULATOR_PROFILE (realistic: Salesforce's published per-record and queueing times) and EMULATOR_TIME_SCALE
# (how many times faster than a real org; default ROWS / 20000, within 2..20),
# DEMO_NO_WAIT=1 (exit after the run instead of keeping the UI up; everything keeps running until `stop`).
# Everything lives in .demo/ (AIRFLOW_HOME=.demo/airflow, emulator data .demo/emulator, logs, pid files).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEMO="$ROOT/.demo"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
DAG_ID="datacloud_opportunity_sync"
ROWS="${ROWS:-200000}"
BAD_ROWS="${BAD_ROWS:-50}"
PARTITIONS="${PARTITIONS:-10}"
PARTITION_KEY="${PARTITION_KEY:-account}"
AIRFLOW_PORT="${AIRFLOW_PORT:-8080}"
DEMO_TIMEOUT="${DEMO_TIMEOUT:-1800}"
EMULATOR_PROFILE="${EMULATOR_PROFILE:-realistic}"
# Jobs should take a few seconds at least, as real ones do (and Airflow 3.3.2 mis-handles a deferral whose
# trigger fires within a second or two, apache/airflow#72716): scale time by the data size.
EMULATOR_TIME_SCALE="${EMULATOR_TIME_SCALE:-$(( ROWS >= 400000 ? 20 : (ROWS >= 40000 ? ROWS / 20000 : 2) ))}"
export AIRFLOW_HOME="$DEMO/airflow"
EMU_DIR="$DEMO/emulator"
API="http://127.0.0.1:$AIRFLOW_PORT"

say() { printf '\033[1m[demo %s]\033[0m %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { say "ERROR: $*"; exit 1; }

stop_pidfile() {  # stop the process group a pid file names (we started it with setsid, so pgid == pid)
  local file="$1" pid
  [[ -f "$file" ]] || return 0
  pid="$(cat "$file")"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    say "stopping $(basename "$file" .pid) (process group $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true  # whatever of that group is still there after 20 s
  fi
  rm -f "$file"
}

stop_all() {
  stop_pidfile "$DEMO/airflow.pid"
  stop_pidfile "$DEMO/emulator.pid"
}

if [[ "${1:-}" == "stop" ]]; then
  stop_all
  say "stopped"
  exit 0
fi

[[ -x "$PY" ]] || die "no virtualenv at $VENV: run 'make venv' first"
export PATH="$VENV/bin:$PATH"
command -v airflow >/dev/null || die "airflow is not on PATH ($VENV/bin)"

T0=$(date +%s)
mkdir -p "$DEMO"
stop_all  # a previous demo still running would hold the ports and the databases
KEEP_RUNNING=0  # set once the demo is up and the user chose DEMO_NO_WAIT: then exiting leaves it running
trap 'echo; stop_all; say "stopped"; exit 130' INT TERM
trap 'if [[ $KEEP_RUNNING != 1 ]]; then stop_all; fi' EXIT  # a failed step never leaves servers behind

free_port() {  # the port if nobody listens on it (SO_REUSEADDR, as the servers use: TIME_WAIT is fine), or 0 → any
  "$PY" -c 'import socket,sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); print(s.getsockname()[1])' "$1" 2>/dev/null
}
if ! free_port "$AIRFLOW_PORT" >/dev/null; then
  die "port $AIRFLOW_PORT is taken (another Airflow?); set AIRFLOW_PORT"
fi
EMULATOR_PORT="${EMULATOR_PORT:-8443}"
EMULATOR_PORT="$(free_port "$EMULATOR_PORT" || free_port 0)"

# -- 1. emulator -------------------------------------------------------------------------------------------------
say "seeding the emulator with $ROWS Data Cloud rows ($BAD_ROWS that Salesforce will reject) ..."
rm -rf "$EMU_DIR"
(cd "$ROOT" && "$PY" -m emulator seed --data-dir "$EMU_DIR" --records "$ROWS" --bad-rows "$BAD_ROWS") \
  > "$DEMO/seed.log" 2>&1 || { tail -20 "$DEMO/seed.log"; die "seeding failed"; }
T_SEED=$(date +%s)
say "seeded in $((T_SEED - T0))s; starting the emulator on https://127.0.0.1:$EMULATOR_PORT" \
  "(profile $EMULATOR_PROFILE, time scale $EMULATOR_TIME_SCALE)"
cd "$ROOT"
# setsid: its own process group (pgid == pid, no fork: a background job of a script is no group leader), so
# `stop` ends the server and everything it started, and nothing else.
setsid "$PY" -m emulator serve --data-dir "$EMU_DIR" --port "$EMULATOR_PORT" --profile "$EMULATOR_PROFILE" \
  --time-scale "$EMULATOR_TIME_SCALE" > "$DEMO/emulator.log" 2>&1 < /dev/null &
echo $! > "$DEMO/emulator.pid"
for _ in $(seq 1 120); do
  [[ -f "$EMU_DIR/connection.json" ]] && break
  kill -0 "$(cat "$DEMO/emulator.pid")" 2>/dev/null || { tail -20 "$DEMO/emulator.log"; die "the emulator exited"; }
  sleep 0.25
done
[[ -f "$EMU_DIR/connection.json" ]] || die "the emulator did not write its connection file"
conn_field() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$EMU_DIR/connection.json" "$1"; }
CA_BUNDLE="$(conn_field ca_bundle)"
CONTROL_URL="$(conn_field control_url)"
for _ in $(seq 1 60); do
  curl -fsS --cacert "$CA_BUNDLE" "$CONTROL_URL/health" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fsS --cacert "$CA_BUNDLE" "$CONTROL_URL/health" >/dev/null || die "the emulator is not healthy (see $DEMO/emulator.log)"

# -- 2. Airflow ----------------------------------------------------------------------------------------------------
export AIRFLOW_CONN_SALESFORCE_DEFAULT="$(conn_field airflow_conn)"
export REQUESTS_CA_BUNDLE="$CA_BUNDLE" SSL_CERT_FILE="$CA_BUNDLE"  # the emulator's own CA; TLS stays verified
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT="$AIRFLOW_PORT"
export AIRFLOW__API__BASE_URL="$API"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="$API/execution/"
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=5
# The demo runs the DAG once, by hand, with the demo's params: no nightly run on top of it.
export AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE=False
export SYNC_ARTIFACTS_URL="file://$AIRFLOW_HOME/sync_artifacts"
mkdir -p "$AIRFLOW_HOME"
# A fresh metadata database every time: a run left "running" by an interrupted demo would hold the DAG's only
# active-run slot (max_active_runs=1) and queue the new run forever. The admin password file is kept.
rm -rf "$AIRFLOW_HOME"/airflow.db* "$AIRFLOW_HOME/logs"
"$PY" - "$DEMO/demo.json" <<PYEOF
import json, os, sys
keys = ["AIRFLOW_HOME", "AIRFLOW_CONN_SALESFORCE_DEFAULT", "SYNC_ARTIFACTS_URL"]
settings = {k: os.environ[k] for k in keys}
settings["AIRFLOW_API_URL"] = "$API"
open(sys.argv[1], "w").write(json.dumps(settings, indent=1))
os.chmod(sys.argv[1], 0o600)
PYEOF

say "preparing the metadata database and the salesforce_bulk pool"
airflow db migrate > "$DEMO/airflow-setup.log" 2>&1 || { tail -20 "$DEMO/airflow-setup.log"; die "airflow db migrate failed"; }
airflow pools set salesforce_bulk 16 "Concurrent Salesforce Bulk API 2.0 jobs of the Data Cloud sync" \
  --include-deferred >> "$DEMO/airflow-setup.log" 2>&1 || { tail -20 "$DEMO/airflow-setup.log"; die "creating the pool failed"; }

say "starting airflow standalone on $API (log: .demo/airflow.log)"
setsid airflow standalone > "$DEMO/airflow.log" 2>&1 < /dev/null &
echo $! > "$DEMO/airflow.pid"
for _ in $(seq 1 180); do
  curl -fsS "$API/api/v2/monitor/health" >/dev/null 2>&1 && \
    [[ -f "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated" ]] && break
  kill -0 "$(cat "$DEMO/airflow.pid")" 2>/dev/null || { tail -30 "$DEMO/airflow.log"; die "airflow standalone exited"; }
  sleep 1
done
curl -fsS "$API/api/v2/monitor/health" >/dev/null || die "Airflow's API did not come up (see $DEMO/airflow.log)"
T_UP=$(date +%s)
say "Airflow is up after $((T_UP - T_SEED))s"

# -- 3. one run, watched ----------------------------------------------------------------------------------------
# Long steps run in the background and are waited for: `wait` returns at once on a signal, so Ctrl-C (or a TERM)
# reaches the trap immediately instead of after the step.
CHILD=""
in_background() {  # in_background OUTFILE CMD... : run CMD with stdout to OUTFILE, wait for it
  local out="$1"; shift
  "$@" > "$out" &
  CHILD=$!
  local rc=0
  wait "$CHILD" || rc=$?
  CHILD=""
  return "$rc"
}
trap 'echo; [[ -n "$CHILD" ]] && kill "$CHILD" 2>/dev/null; stop_all; say "stopped"; exit 130' INT TERM

in_background "$DEMO/run_id" "$PY" "$ROOT/include/scripts/demo_run.py" trigger --partitions "$PARTITIONS" \
  --partition-key "$PARTITION_KEY" || die "could not trigger the DAG"
RUN_ID="$(cat "$DEMO/run_id")"
T_TRIG=$(date +%s)
say "triggered run $RUN_ID (partitions=$PARTITIONS, partition_key=$PARTITION_KEY); progress every 20 s:"
in_background "$DEMO/run_state" "$PY" "$ROOT/include/scripts/demo_run.py" wait "$RUN_ID" --timeout "$DEMO_TIMEOUT" \
  || die "lost track of the run"
STATE="$(cat "$DEMO/run_state")"
T_DONE=$(date +%s)
say "run finished: $STATE after $((T_DONE - T_TRIG))s"
(cd "$ROOT" && "$PY" -m include.status --run-id "$RUN_ID" --verify) || true

PASSWORD="$("$PY" -c 'import json,sys; print(next(iter(json.load(open(sys.argv[1])).values())))' \
  "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated")"
USERNAME="$("$PY" -c 'import json,sys; print(next(iter(json.load(open(sys.argv[1])))))' \
  "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated")"
say "timings: seed $((T_SEED - T0))s, Airflow up $((T_UP - T_SEED))s, run $((T_DONE - T_TRIG))s, total $((T_DONE - T0))s"
say "failed rows, one CSV per partition: $AIRFLOW_HOME/sync_artifacts/$DAG_ID/"
say "Airflow UI: $API/dags/$DAG_ID   login: $USERNAME / $PASSWORD"
say "progress of any run: make status      stop everything: make demo-stop (or Ctrl-C here)"

if [[ -n "${DEMO_NO_WAIT:-}" ]]; then
  KEEP_RUNNING=1
  trap - INT TERM
  [[ "$STATE" == "success" ]]
  exit $?
fi
while kill -0 "$(cat "$DEMO/airflow.pid" 2>/dev/null || echo 0)" 2>/dev/null; do sleep 2; done
say "airflow standalone is gone; stopping the emulator"
stop_all
