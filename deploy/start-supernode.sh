#!/usr/bin/env bash
# Partner site: a SuperNode that dials the consortium's SuperLink with the CA certificate and its private key,
# and dials again whenever the SuperLink goes away (restart, network cut).
# Usage: deploy/start-supernode.sh SUPERLINK_ADDR CA_CRT PRIVATE_KEY DATA_PATH WORK_DIR [CLIENTAPP_PORT]
#   DATA_PATH: this site's SITE.toml (prepared once into WORK_DIR) or a prepared patch store.
#   SITE_NAME (environment, optional): the name reports show for this site (letters, digits, ._-; at most 64);
#   default: the SITE.toml's `site`, else the data folder's name.
#
# Reconnecting: a SuperNode exits when its SuperLink restarts (the new SuperLink does not know its node id). This
# script then starts it again after a backoff (FEDST_RECONNECT_MIN_S, default 5 s, doubling up to
# FEDST_RECONNECT_MAX_S, default 300 s; back to the minimum after a connection that lasted a minute).
# A refused connection (Flower's "Exit Code: 305": key not registered, wrong CA) is not retried forever:
#   - refused before this script ever connected: a setup problem; explained, exit status 3 at once;
#   - refused after it had been connected: the SuperLink restarted and forgot the registered keys (in-memory
#     state); retried until the operator re-registers them, for at most FEDST_REFUSED_GRACE_S (default 1800 s),
#     then explained, exit status 3.
# Any other Flower exit code (bad address, TLS or key file) is a setup problem: explained, exit status 3.
#
# Site worker (client/worker.py): Flower starts a fresh ClientApp process per message; the site worker keeps torch,
# the C2L code and the store loaded and the ClientApp forwards to it over a Unix socket only this user can open.
#   FEDST_SITE_WORKER=start (default): this script starts `fedst site worker` (log: WORK_DIR/worker.log) and stops
#     it on exit; =external: one runs already (e.g. deploy/systemd/fedst-site-worker.service); =off: none (every
#     message in a fresh process, as before). FEDST_WORKER_SOCKET: its socket (default WORK_DIR/worker/site.sock).
#   If the worker is gone, the ClientApp runs the phase itself (run config site-worker = "auto").
# SIGTERM / SIGINT stop the SuperNode and the script (status 0). The SuperNode's own log goes to stdout and to
# WORK_DIR/supernode.log (the last attempt only).
set -euo pipefail
link="${1:?host:port}"; ca="${2:?ca.crt}"; key="${3:?private key}"; data="${4:?SITE.toml or store}"; work="${5:?work dir}"
port="${6:-9094}"
min_wait="${FEDST_RECONNECT_MIN_S:-5}"; max_wait="${FEDST_RECONNECT_MAX_S:-300}"; grace="${FEDST_REFUSED_GRACE_S:-1800}"
say() { echo "start-supernode.sh: $*" >&2; }

mkdir -p "$work"
data="$(realpath "$data")"; work="$(realpath "$work")"

# The node config goes to the SuperNode as a TOML file (`--node-config FILE.toml`, read by Flower with a TOML
# parser): an inline `key='value'` list cannot hold a path with a quote (Flower's pattern ends a value at the
# next quote and cuts it silently). Values are TOML basic strings: backslash and double quote escaped.
site_worker="${FEDST_SITE_WORKER:-start}"; worker_socket="${FEDST_WORKER_SOCKET:-$work/worker/site.sock}"
case "$site_worker" in
  start | external | off) ;;
  *) say "FEDST_SITE_WORKER is '$site_worker' (expected start, external or off)"; exit 2 ;;
esac
if [[ "$site_worker" == start ]] && ! command -v fedst >/dev/null; then
  say "fedst is not on PATH: no site worker, every message runs in its own process (activate fedst's venv)"
  site_worker=off
fi
for value in "DATA_PATH=$data" "WORK_DIR=$work" "SITE_NAME=${SITE_NAME:-}" "FEDST_WORKER_SOCKET=$worker_socket"; do
  if [[ "$value" == *[[:cntrl:]]* ]]; then
    say "${value%%=*} contains a control character (newline, tab, ...): $(printf '%q' "${value#*=}")"
    exit 2
  fi
done
toml_string() {
  local value="${1//\\/\\\\}"
  printf '"%s"' "${value//\"/\\\"}"
}
node_config="$work/node-config.toml"
{
  echo "data-path = $(toml_string "$data")"
  echo "work-dir = $(toml_string "$work")"
  if [[ -n "${SITE_NAME:-}" ]]; then echo "site = $(toml_string "$SITE_NAME")"; fi
  if [[ "$site_worker" != off ]]; then echo "worker-socket = $(toml_string "$worker_socket")"; fi
} >"$node_config.tmp"
mv "$node_config.tmp" "$node_config"

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# SuperExec looks for a new ClientApp task every FLWR_SUPEREXEC_TASK_POLL_INTERVAL s (Flower's default 1 s): a
# local call, cheap at 0.2 s.
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}"
attempt_log="$work/supernode.log"
child=""; stopping=0; worker=""
trap 'stopping=1; if [[ -n "$child" ]]; then kill -TERM "$child" 2>/dev/null || true; fi' TERM INT
stop_worker() { if [[ -n "$worker" ]]; then kill -TERM "$worker" 2>/dev/null || true; wait "$worker" 2>/dev/null || true; fi; }
trap stop_worker EXIT
if [[ "$site_worker" == start ]]; then
  fedst site worker --socket "$worker_socket" >"$work/worker.log" 2>&1 &
  worker=$!
  say "site worker started (pid $worker, socket $worker_socket, log $work/worker.log)"
fi

# Wait for the background process $child (so that a signal reaches the trap at once); its exit status in $status.
wait_child() {
  status=0
  wait "$child" || status=$?
  while kill -0 "$child" 2>/dev/null; do  # a trapped signal interrupts `wait`: wait for the real exit
    status=0
    wait "$child" || status=$?
  done
  child=""
}

refused_help() {
  say "the SuperLink at $link refused this SuperNode (Flower exit code 305): $1"
  say "  - is the public key of $key registered? The operator runs: deploy/register-node.sh <site>.pub <connection>"
  say "  - is $ca the consortium's CA certificate (from the operator)?"
  say "  see $attempt_log; fix, then start this script again"
}

connected=0; wait_s="$min_wait"; refused_since=""
while true; do
  started=$SECONDS
  : >"$attempt_log"
  flower-supernode \
    --superlink "$link" \
    --root-certificates "$ca" \
    --auth-supernode-private-key "$key" \
    --host 127.0.0.1 --port "$port" \
    --node-config "$node_config" >>"$attempt_log" 2>&1 &
  child=$!
  if ((stopping)); then kill -TERM "$child"; fi  # a signal that came before $child was set
  tail -n +1 -f --pid="$child" "$attempt_log" &  # the console shows the SuperNode's log as it is written
  tailer=$!
  wait_child
  wait "$tailer" 2>/dev/null || true
  if ((stopping)); then say "stopped"; exit 0; fi

  if grep -q "SuperNode ID:" "$attempt_log"; then connected=1; fi
  code="$(grep -oE 'Exit Code: [0-9]+' "$attempt_log" | tail -n 1 | grep -oE '[0-9]+' || true)"
  if [[ "$code" == 305 ]]; then
    if ((!connected)); then
      refused_help "this SuperNode has not connected once since the script started, so retrying will not help"
      exit 3
    fi
    refused_since="${refused_since:-$SECONDS}"
    if ((SECONDS - refused_since >= grace)); then
      refused_help "still refused ${grace} s after the SuperLink came back (FEDST_REFUSED_GRACE_S)"
      exit 3
    fi
    say "refused after a SuperLink restart: waiting for the operator to register this site's key again" \
      "(giving up $((grace - (SECONDS - refused_since))) s from now)"
  elif [[ -n "$code" ]]; then
    say "flower-supernode stopped with Flower exit code $code, a setup problem that retrying cannot fix; see $attempt_log"
    exit 3
  else
    refused_since=""
    say "flower-supernode exited (status $status): the SuperLink went away or restarted"
  fi
  if ((SECONDS - started >= 60)); then wait_s="$min_wait"; fi
  say "reconnecting in ${wait_s} s"
  sleep "$wait_s" &
  child=$!
  if ((stopping)); then kill -TERM "$child"; fi
  wait_child
  if ((stopping)); then say "stopped"; exit 0; fi
  wait_s=$((wait_s * 2 > max_wait ? max_wait : wait_s * 2))
done
