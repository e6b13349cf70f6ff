#!/usr/bin/env bash
# Partner site: a SuperNode that dials the consortium's SuperLink with the CA certificate and its private key.
# Usage: deploy/start-supernode.sh SUPERLINK_ADDR CA_CRT PRIVATE_KEY DATA_PATH WORK_DIR [CLIENTAPP_PORT]
#   DATA_PATH: this site's SITE.toml (prepared once into WORK_DIR) or a prepared patch store.
#   SITE_NAME (environment, optional): the name reports show for this site (letters, digits, ._-; at most 64);
#   default: the SITE.toml's `site`, else the data folder's name.
set -euo pipefail
link="${1:?host:port}"; ca="${2:?ca.crt}"; key="${3:?private key}"; data="${4:?SITE.toml or store}"; work="${5:?work dir}"
port="${6:-9094}"
mkdir -p "$work"
node_config="data-path='$(realpath "$data")' work-dir='$(realpath "$work")'"
if [[ -n "${SITE_NAME:-}" ]]; then node_config+=" site='$SITE_NAME'"; fi
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec flower-supernode \
  --superlink "$link" \
  --root-certificates "$ca" \
  --auth-supernode-private-key "$key" \
  --host 127.0.0.1 --port "$port" \
  --node-config "$node_config"
