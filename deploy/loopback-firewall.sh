#!/usr/bin/env bash
# Operator (lead site), run as root: only the named local users may connect to the SuperLink's loopback port.
# Usage: deploy/loopback-firewall.sh PORT USER [USER ...]     install (or replace) the rule set
#        deploy/loopback-firewall.sh --remove PORT            remove it
# Why: the SuperLink listens on 127.0.0.1 only, but every local user of the host can connect there, and Flower
# 1.41's Control API has no user authentication (deploy/README.md, threat model). Allow the SuperLink's own user
# (its ServerApps connect back to the same port) and nginx's worker user (the proxy); every other local user's
# connection is rejected at once (TCP reset), before any byte reaches the SuperLink.
# The rules live in their own chain, FEDST-SL-<PORT>, jumped to from OUTPUT (locally generated packets are
# matched by socket owner there), so re-running the script replaces them and --remove takes them all out.
# Needs iptables (Debian: apt-get install iptables) with the owner match; IPv4 only (the SuperLink binds 127.0.0.1).
set -euo pipefail
remove=0
if [ "${1:-}" = "--remove" ]; then remove=1; shift; fi
port="${1:?port of the SuperLink on 127.0.0.1}"; shift
case "$port" in '' | *[!0-9]*) echo "error: port must be a number, got '$port'" >&2; exit 2 ;; esac
chain="FEDST-SL-$port"
jump=(OUTPUT -o lo -p tcp -d 127.0.0.1 --dport "$port" -j "$chain")

if iptables -C "${jump[@]}" 2>/dev/null; then iptables -D "${jump[@]}"; fi
if iptables -n -L "$chain" >/dev/null 2>&1; then iptables -F "$chain"; iptables -X "$chain"; fi
if [ "$remove" = 1 ]; then echo "removed the firewall of 127.0.0.1:$port"; exit 0; fi

[ "$#" -ge 1 ] || { echo "error: name at least one user allowed to connect (the SuperLink's, nginx's)" >&2; exit 2; }
for user in "$@"; do
  id -u "$user" >/dev/null 2>&1 || { echo "error: no such user: '$user'" >&2; exit 2; }
done
iptables -N "$chain"
for user in "$@"; do
  iptables -A "$chain" -m owner --uid-owner "$(id -u "$user")" -j RETURN
done
iptables -A "$chain" -p tcp -j REJECT --reject-with tcp-reset
iptables -I "${jump[@]}"
echo "127.0.0.1:$port: only $* may connect"
