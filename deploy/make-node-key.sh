#!/usr/bin/env bash
# One SuperNode key pair (ECDSA P-384, as Flower's node authentication expects). Run AT THE SITE:
# the private key never leaves it; send only NAME.pub to the operator.
# Usage: deploy/make-node-key.sh OUT_DIR NAME   -> OUT_DIR/NAME (private, 0600), OUT_DIR/NAME.pub
set -euo pipefail
out="${1:?usage: make-node-key.sh OUT_DIR NAME}"; name="${2:?site name}"
mkdir -p "$out"
[ -e "$out/$name" ] && { echo "refusing to overwrite $out/$name (rotate: move it away first)" >&2; exit 1; }
ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedst-$name" -f "$out/$name"
chmod 600 "$out/$name"
echo "private: $out/$name  public (send to the operator): $out/$name.pub"
