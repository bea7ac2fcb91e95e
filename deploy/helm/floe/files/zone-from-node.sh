# Reads NODE_NAME's ZONE_LABEL through the Kubernetes API and writes its
# value to ZONE_FILE (empty when the node has no such label: floe then
# runs without a zone). POSIX sh with curl, tr, grep and sed only.
set -eu
api="${KUBE_API:-https://kubernetes.default.svc}"
sa="${SA_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}"
auth=""
if [ -r "$sa/token" ]; then
  auth="Authorization: Bearer $(cat "$sa/token")"
fi
cacert=""
if [ -r "$sa/ca.crt" ]; then
  cacert="--cacert $sa/ca.crt"
fi
# shellcheck disable=SC2086 # $cacert is two words or none
node="$(curl -sS --fail --max-time 10 --retry 5 --retry-delay 1 --retry-all-errors $cacert \
  -H "$auth" "$api/api/v1/nodes/$NODE_NAME")"
# One JSON token per line; the label's key is quoted exactly (managed
# fields spell it "f:KEY", which does not match).
zone="$(printf '%s' "$node" | tr ',{}' '\n\n\n' | grep -F "\"$ZONE_LABEL\"" \
  | sed -n 's/^[^:]*"[[:space:]]*:[[:space:]]*"\([^"]*\)".*$/\1/p' | head -n 1 || true)"
printf '%s\n' "$zone" > "$ZONE_FILE"
echo "node $NODE_NAME: $ZONE_LABEL=${zone:-<none>}"
