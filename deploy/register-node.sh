#!/usr/bin/env bash
# Operator: register (or unregister) a site's public key with the SuperLink (needs --enable-supernode-auth).
# Usage: deploy/register-node.sh KEY.pub [CONNECTION]          register
#        deploy/register-node.sh --remove NODE_ID [CONNECTION] unregister (see `flwr supernode list`)
# CONNECTION is a [superlink.<name>] entry of $FLWR_HOME/config.toml (default: fedst).
set -euo pipefail
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
if [ "${1:-}" = "--remove" ]; then
  flwr supernode unregister "${2:?node id}" "${3:-fedst}"
else
  flwr supernode register "${1:?KEY.pub}" "${2:-fedst}"
fi
