#!/usr/bin/env bash
# Consortium CA + SuperLink server certificate (SAN: DNS:localhost, IP:127.0.0.1, plus any extra names).
# Usage: deploy/make-certs.sh OUT_DIR [extra SAN entries, e.g. DNS:fl.hospital-a.org IP:10.0.0.5]
# Writes OUT_DIR/ca.crt ca.key server.crt server.key (keys 0600). Give ca.crt to every site; keep *.key secret.
set -euo pipefail
out="${1:?usage: make-certs.sh OUT_DIR [SAN...]}"; shift || true
san="DNS:localhost,IP:127.0.0.1"
for extra in "$@"; do san="$san,$extra"; done
mkdir -p "$out"; umask 077
openssl req -x509 -newkey rsa:4096 -sha256 -days 3650 -nodes -subj "/CN=fedst consortium CA" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey rsa:4096 -sha256 -nodes -subj "/CN=fedst superlink" \
  -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$san" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days 825 -sha256 \
  -extfile "$out/server.ext" -out "$out/server.crt" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.crt"
echo "CA: $out/ca.crt  server: $out/server.crt ($san)"
