#!/usr/bin/env bash
# Operator (lead site): the SuperLink with TLS, SuperNode authentication, no runtime dependency installation.
# Usage: deploy/start-superlink.sh CERT_DIR STATE_DIR [PORT]
# Listens on 127.0.0.1 ONLY: Flower 1.41 serves Fleet, Control and Runtime on this one port and the Control API has
# no user authentication, so the proxy (deploy/nginx.conf) is the only way in from outside; local users of this
# host can still reach it (deploy/README.md, threat model). Flower's internal switches that would open extra gRPC
# Fleet/Control ports on 0.0.0.0 (FLWR_INTERNAL_GRPC_*_API) are cleared.
# State is in memory by default: Flower's SQLite state has a fixed 5 s lock timeout that a ~100 MB model update
# outlasts on a busy host (HTTP 500, replies lost; server/procs.py). FEDST_SUPERLINK_DATABASE=FILE
# (e.g. STATE_DIR/state.db) keeps SQLite state: registered keys and run history survive a restart; small models only.
set -euo pipefail
certs="${1:?cert dir (ca.crt server.crt server.key)}"; state="${2:?state dir}"; port="${3:-9200}"
mkdir -p "$state"
unset FLWR_INTERNAL_GRPC_CONTROL_API FLWR_INTERNAL_GRPC_FLEET_API
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec flower-superlink \
  --host 127.0.0.1 --port "$port" \
  --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.crt" --ssl-keyfile "$certs/server.key" \
  --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --database "${FEDST_SUPERLINK_DATABASE:-:flwr-in-memory:}"
