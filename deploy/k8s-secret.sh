#!/usr/bin/env bash
# The Kubernetes Secret `sqs-tls` (namespace sqs-sd) that deploy/k8s/*.yaml mount read-only: the TLS
# material of the edge-cloud link, made here by our own commands, never committed.
#
# Usage: deploy/k8s-secret.sh [DIR]          (`make k8s-secret`)
#   DIR  where the CA, the certificates and the token are made and kept (default
#        ${SQS_K8S_TLS_DIR:-$HOME/.local/state/sqs-sd/k8s-tls}, outside the repository). Made once:
#        a second run reuses what DIR holds (the CA key stays in DIR only, never in the cluster).
#   SQS_K8S_SECRET_OUT=FILE  write the Secret's manifest to FILE instead of applying it (no cluster)
#   SQS_CLOUD_BIN            the sqs-cloud to run (default: sqs-cloud on PATH; make passes the venv's)
#   TLS_SANS                 extra server names (space-separated) for the certificate, beside those
#                            sqs-cloud gen-certs always writes (envoy, envoy.sqs-sd.svc..., cloud, ...)
#
# What it runs, by hand:
#   sqs-cloud gen-certs DIR                                 # ca.pem ca-key.pem server.pem server-key.pem ...
#   sqs-cloud token edge --token-file DIR/tokens > DIR/edge-token
#   kubectl create secret generic sqs-tls -n sqs-sd \
#     --from-file=DIR/ca.pem --from-file=DIR/server.pem --from-file=DIR/server-key.pem \
#     --from-file=DIR/tokens --from-file=DIR/edge-token --dry-run=client -o yaml | kubectl apply -f -
#
# Keys of the Secret and who mounts which (deploy/k8s/*.yaml, at /etc/sqs-tls):
#   ca.pem        cloud (its healthcheck), envoy (verifies the replicas), edge (verifies Envoy)
#   server.pem, server-key.pem   cloud and envoy
#   tokens        cloud (NAME SHA256 lines: hashes, not tokens)
#   edge-token    edge only (its bearer token), mounted as /etc/sqs-tls/token
# More edges: `sqs-cloud token NAME --token-file DIR/tokens`, run this again, then restart the clouds
# or send them SIGHUP (kubectl rollout restart deployment/cloud).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-${SQS_K8S_TLS_DIR:-$HOME/.local/state/sqs-sd/k8s-tls}}
SQS_CLOUD=${SQS_CLOUD_BIN:-sqs-cloud}
NAMESPACE=sqs-sd

case $(realpath -m "$DIR")/ in
  "$ROOT"/*) echo "k8s-secret: $DIR is inside the repository; TLS keys never go there" >&2; exit 2 ;;
esac
mkdir -p "$DIR"
chmod 0700 "$DIR"
if [[ ! -s $DIR/server.pem ]]; then
  sans=()
  for name in ${TLS_SANS:-}; do sans+=(--san "$name"); done
  "$SQS_CLOUD" gen-certs "$DIR" "${sans[@]}" >/dev/null
fi
if [[ ! -s $DIR/edge-token ]]; then
  umask 077
  "$SQS_CLOUD" token edge --token-file "$DIR/tokens" >"$DIR/edge-token" 2>/dev/null
fi

files=()
for f in ca.pem server.pem server-key.pem tokens edge-token; do files+=("--from-file=$DIR/$f"); done
manifest=$(kubectl create secret generic sqs-tls -n "$NAMESPACE" "${files[@]}" --dry-run=client -o yaml)
if [[ -n ${SQS_K8S_SECRET_OUT:-} ]]; then
  (umask 077 && printf '%s\n' "$manifest" >"$SQS_K8S_SECRET_OUT")
  echo "k8s-secret: wrote the Secret sqs-tls to $SQS_K8S_SECRET_OUT (material kept in $DIR)" >&2
  exit 0
fi
kubectl apply -f "$ROOT/deploy/k8s/namespace.yaml" >/dev/null
printf '%s\n' "$manifest" | kubectl apply -f -
echo "k8s-secret: Secret $NAMESPACE/sqs-tls applied (material kept in $DIR)" >&2
