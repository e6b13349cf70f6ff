#!/usr/bin/env bash
# Consortium CA + SuperLink server certificate (SAN: DNS:localhost, IP:127.0.0.1, plus any extra names), and the
# operator's client certificate for the proxy's Control listener (mTLS, deploy/nginx.conf).
# Usage: deploy/make-certs.sh OUT_DIR [extra SAN entries, e.g. DNS:fl.hospital-a.org IP:10.0.0.5]
#          writes ca.crt ca.key server.crt server.key (give ca.crt to every site),
#          operator-ca.crt operator-ca.key (the proxy trusts operator-ca.crt) and operator.crt operator.key
#        deploy/make-certs.sh --operator OUT_DIR NAME
#          one more operator client certificate NAME.crt NAME.key from OUT_DIR/operator-ca.key (made if missing)
# Keys are 0600; keep every *.key secret (operator-ca.key and ca.key best offline).
set -euo pipefail

# An operator client certificate (EKU clientAuth) signed by the operator CA; the CA is created if missing.
operator_cert() {
  local out="$1" name="$2"
  if [ ! -e "$out/operator-ca.key" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -days 3650 -nodes \
      -subj "/CN=fedst operator CA" -keyout "$out/operator-ca.key" -out "$out/operator-ca.crt" 2>/dev/null
    chmod 644 "$out/operator-ca.crt"
  fi
  [ -e "$out/$name.key" ] && { echo "refusing to overwrite $out/$name.key" >&2; exit 1; }
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -nodes -subj "/CN=fedst operator $name" \
    -keyout "$out/$name.key" -out "$out/$name.csr" 2>/dev/null
  printf "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n" > "$out/$name.ext"
  openssl x509 -req -in "$out/$name.csr" -CA "$out/operator-ca.crt" -CAkey "$out/operator-ca.key" -CAcreateserial \
    -days 825 -sha256 -extfile "$out/$name.ext" -out "$out/$name.crt" 2>/dev/null
  rm -f "$out/$name.csr" "$out/$name.ext" "$out/operator-ca.srl"
  chmod 644 "$out/$name.crt"
  echo "operator client certificate: $out/$name.crt (key $out/$name.key; the proxy trusts $out/operator-ca.crt)"
}

if [ "${1:-}" = "--operator" ]; then
  out="${2:?usage: make-certs.sh --operator OUT_DIR NAME}"; name="${3:?operator certificate name}"
  mkdir -p "$out"; umask 077
  operator_cert "$out" "$name"
  exit 0
fi

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
operator_cert "$out" operator
