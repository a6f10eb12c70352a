#!/usr/bin/env bash
# make test-distributed, step 1: PostgreSQL and Redis from Debian's packages when they are missing.
#
# Only the binaries are needed: the test runs its own throw-away PostgreSQL cluster (initdb/pg_ctl as the
# `postgres` user) and its own redis-server, on free 127.0.0.1 ports with their data under .distributed/.
# The system-wide services the packages come with are not started: when no /usr/sbin/policy-rc.d exists, one
# that forbids service starts is in place for the duration of the install.
set -euo pipefail

have_postgres() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; }
have_redis() { command -v redis-server >/dev/null; }

need=()
have_postgres || need+=(postgresql)
have_redis || need+=(redis-server)
if ((${#need[@]} == 0)); then
  echo "[distributed] PostgreSQL and Redis are installed"
  exit 0
fi

SUDO=()
[[ "$(id -u)" == 0 ]] || SUDO=(sudo -n)
POLICY=/usr/sbin/policy-rc.d
if [[ ! -e "$POLICY" ]]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod 755 "$POLICY"
  trap '"${SUDO[@]}" rm -f "$POLICY"' EXIT
fi
T0=$(date +%s)
echo "[distributed] installing ${need[*]} from Debian's packages ..."
export DEBIAN_FRONTEND=noninteractive
LOG="$(mktemp)"
{ "${SUDO[@]}" apt-get update -qq && \
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 "${need[@]}"; } >"$LOG" 2>&1 \
  || { tail -30 "$LOG" >&2; echo "[distributed] apt-get failed (log: $LOG)" >&2; exit 1; }
rm -f "$LOG"
have_postgres || { echo "[distributed] PostgreSQL's initdb is still missing" >&2; exit 1; }
have_redis || { echo "[distributed] redis-server is still missing" >&2; exit 1; }
echo "[distributed] installed ${need[*]} in $(( $(date +%s) - T0 ))s"
