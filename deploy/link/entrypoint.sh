#!/usr/bin/env bash
# The emulated edge-cloud link: a TCP relay (socat) from link:LINK_LISTEN_PORT to
# LINK_CLOUD_HOST:LINK_CLOUD_PORT, with both directions shaped by tc on this container's egress:
#
#   edge --(edge_net)--> [eth edge-side]  link  [eth cloud-side] --(cloud_net)--> cloud
#   uplink   (edge -> cloud) leaves through the cloud-side interface: LINK_UP_*   settings
#   downlink (cloud -> edge) leaves through the edge-side interface:  LINK_DOWN_* settings
#
# Per direction (any previous root qdisc is removed first): a tbf root at the rate (10 ms bucket),
# netem child with delay [jitter, normal distribution] [loss] and a packet limit. With zero delay, jitter and
# loss (or LINK_NETEM=off) the leaf is a pfifo and netem is not needed.
#
# Usage: entrypoint.sh [run|shape|plan|health]
#   run     (default) wait for the cloud, shape, then exec socat as nobody
#   shape   apply the shaping and exit (tests, or a second look at the settings)
#   plan    print the tc commands `shape` would run, run nothing (dry run)
#   health  healthcheck: shaping applied, relay listening, cloud port reachable
#
# Settings (environment; an empty or unset LINK_UP_* / LINK_DOWN_* falls back to LINK_*):
#   LINK_RATE=1mbit  LINK_DELAY=25ms  LINK_JITTER=5ms  LINK_LOSS=0%  LINK_QUEUE_PKTS=1000
#   LINK_UP_RATE LINK_DOWN_RATE LINK_UP_DELAY LINK_DOWN_DELAY LINK_UP_JITTER LINK_DOWN_JITTER
#   LINK_UP_LOSS LINK_DOWN_LOSS
#   LINK_NETEM=auto|on|off   auto: netem where the kernel has it, else rate only (said in the
#                            log and the state file); on: fail without netem; off: rate only
#   LINK_OFFLOADS=off|keep   off (default): disable TSO/GSO/GRO so tc sees wire-sized packets
#   LINK_LISTEN_PORT=50051 LINK_CLOUD_HOST=cloud LINK_CLOUD_PORT=50051
#   LINK_UP_DEV, LINK_DOWN_DEV   interfaces to shape (default: the route to the cloud for the
#                                uplink, every other non-loopback interface for the downlink)
#   LINK_WAIT_S=120          how long `run` waits for the cloud's address and route
set -euo pipefail

say() { echo "link: $*" >&2; }
die() { say "error: $*"; exit 1; }

LISTEN_PORT=${LINK_LISTEN_PORT:-50051}
CLOUD_HOST=${LINK_CLOUD_HOST:-cloud}
CLOUD_PORT=${LINK_CLOUD_PORT:-50051}
STATE_DIR=${LINK_STATE_DIR:-/run/sqs-link}

RATE=${LINK_RATE:-1mbit}
DELAY=${LINK_DELAY:-25ms}
JITTER=${LINK_JITTER:-5ms}
LOSS=${LINK_LOSS:-0%}
UP_RATE=${LINK_UP_RATE:-$RATE}
DOWN_RATE=${LINK_DOWN_RATE:-$RATE}
UP_DELAY=${LINK_UP_DELAY:-$DELAY}
DOWN_DELAY=${LINK_DOWN_DELAY:-$DELAY}
UP_JITTER=${LINK_UP_JITTER:-$JITTER}
DOWN_JITTER=${LINK_DOWN_JITTER:-$JITTER}
UP_LOSS=${LINK_UP_LOSS:-$LOSS}
DOWN_LOSS=${LINK_DOWN_LOSS:-$LOSS}
QUEUE_PKTS=${LINK_QUEUE_PKTS:-1000}
NETEM=${LINK_NETEM:-auto}
OFFLOADS=${LINK_OFFLOADS:-off}
WAIT_S=${LINK_WAIT_S:-120}

NUM='[0-9]+([.][0-9]+)?'

validate() {
  local v
  for v in "$UP_RATE" "$DOWN_RATE"; do
    [[ $v =~ ^${NUM}([kKmMgGtT]?(bit|bps))$ ]] || die "rate '$v' is not a tc rate such as 1mbit, 500kbit or 125kbps"
  done
  for v in "$UP_DELAY" "$DOWN_DELAY" "$UP_JITTER" "$DOWN_JITTER"; do
    [[ $v =~ ^${NUM}(us|ms|s)?$ ]] || die "time '$v' is not a tc time such as 25ms, 500us or 0"
  done
  for v in "$UP_LOSS" "$DOWN_LOSS"; do
    [[ $v =~ ^${NUM}%?$ ]] || die "loss '$v' is not a percentage such as 0% or 0.5%"
  done
  [[ $QUEUE_PKTS =~ ^[1-9][0-9]*$ ]] || die "LINK_QUEUE_PKTS '$QUEUE_PKTS' is not a positive integer"
  [[ $NETEM == on || $NETEM == off || $NETEM == auto ]] || die "LINK_NETEM must be auto, on or off, not '$NETEM'"
}

is_zero() { [[ $1 =~ ^0+([.]0+)?[a-z%]*$ ]]; }

# netem arguments for one direction, empty when nothing needs netem
netem_args() {
  local delay=$1 jitter=$2 loss=$3 args=()
  if is_zero "$delay" && is_zero "$jitter" && is_zero "$loss"; then
    return 0
  fi
  args+=(delay "$delay")
  if ! is_zero "$jitter"; then args+=("$jitter" distribution normal); fi
  if ! is_zero "$loss"; then args+=(loss "${loss%\%}%"); fi
  echo "${args[*]}"
}

# bytes per second of a tc rate (1mbit, 500kbit, 125kbps, 1.5mbit)
rate_bytes() {
  awk -v r="$1" 'BEGIN {
    n = r + 0; u = tolower(substr(r, length(n "") + 1)); m = 1
    if (u ~ /^k/) m = 1e3; else if (u ~ /^m/) m = 1e6; else if (u ~ /^g/) m = 1e9; else if (u ~ /^t/) m = 1e12
    printf "%d\n", (u ~ /bps$/) ? n * m : n * m / 8 }'
}

# tbf bucket: 10 ms worth of the rate, at least one full frame (1600 bytes)
burst_bytes() { local b; b=$(( $(rate_bytes "$1") / 100 )); echo $(( b < 1600 ? 1600 : b )); }

# tc commands for one direction, one per line. The rate is a tbf at the root: tbf splits the
# kernel's TCP GSO super-packets (TCP always builds them, whatever ethtool says) into frames before
# shaping them, so a slow link is smooth instead of releasing ~10 kB at a time; its child is the
# netem leaf (delay, jitter, loss) or a pfifo.
plan_dev() {
  local dev=$1 rate=$2 delay=$3 jitter=$4 loss=$5 leaf
  leaf=$(netem_args "$delay" "$jitter" "$loss")
  if [[ -n $leaf && $NETEM == off ]]; then
    say "LINK_NETEM=off: $dev gets rate $rate only (ignoring delay $delay, jitter $jitter, loss $loss)"
    leaf=""
  fi
  echo "tc qdisc add dev $dev root handle 1: tbf rate $rate burst $(burst_bytes "$rate") limit $((QUEUE_PKTS * 1514))"
  if [[ -n $leaf ]]; then
    echo "tc qdisc add dev $dev parent 1:1 handle 10: netem $leaf limit $QUEUE_PKTS"
  else
    echo "tc qdisc add dev $dev parent 1:1 handle 10: pfifo limit $QUEUE_PKTS"
  fi
}

ifaces() { ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -v '^lo$' || true; }

cloud_ip() { getent ahostsv4 "$CLOUD_HOST" | awk 'NR==1 {print $1}'; }

# Sets UP_DEV and DOWN_DEVS (overridable with LINK_UP_DEV / LINK_DOWN_DEV).
find_devices() {
  UP_DEV=${LINK_UP_DEV:-}
  if [[ -z $UP_DEV ]]; then
    local ip
    ip=$(cloud_ip) || true
    [[ -n $ip ]] || die "cannot resolve $CLOUD_HOST (is the link on the cloud network?)"
    UP_DEV=$(ip -o route get "$ip" | sed -n 's/.* dev \([^ ]*\).*/\1/p')
    [[ -n $UP_DEV ]] || die "no route to $CLOUD_HOST ($ip)"
  fi
  if [[ -n ${LINK_DOWN_DEV:-} ]]; then
    DOWN_DEVS=$LINK_DOWN_DEV
  else
    DOWN_DEVS=$(ifaces | grep -vx "$UP_DEV" | tr '\n' ' ' | sed 's/ *$//')
  fi
  [[ -n $DOWN_DEVS ]] || die "no edge-side interface besides $UP_DEV (is the link on the edge network?)"
}

# all tc commands, one per line (comment lines start with #); needs find_devices first
plan_all() {
  echo "# uplink (edge -> cloud): $UP_DEV"
  plan_dev "$UP_DEV" "$UP_RATE" "$UP_DELAY" "$UP_JITTER" "$UP_LOSS"
  local dev
  for dev in $DOWN_DEVS; do
    echo "# downlink (cloud -> edge): $dev"
    plan_dev "$dev" "$DOWN_RATE" "$DOWN_DELAY" "$DOWN_JITTER" "$DOWN_LOSS"
  done
}

shape() {
  local commands line err dev netem_used=no netem_missing=no
  validate
  find_devices
  commands=$(plan_all)
  mkdir -p "$STATE_DIR"
  rm -f "$STATE_DIR/shaped"
  for dev in $UP_DEV $DOWN_DEVS; do  # start clean, so that `shape` can run again
    tc qdisc del dev "$dev" root >/dev/null 2>&1 || true
  done
  if [[ $OFFLOADS == off ]] && command -v ethtool >/dev/null; then
    for dev in $UP_DEV $DOWN_DEVS; do
      ethtool -K "$dev" tso off gso off gro off >/dev/null 2>&1 || say "could not disable offloads on $dev (continuing)"
    done
  fi
  while IFS= read -r line; do
    if [[ $line == \#* ]]; then
      say "${line#\# }"
      continue
    fi
    say "  $line"
    if ! err=$($line 2>&1); then
      if [[ $line == *" netem "* && $NETEM == auto ]]; then
        say "WARNING: netem is not available in this kernel ($err): LINK_NETEM=auto falls back to"
        say "WARNING: rate-only shaping (tbf + pfifo); delay, jitter and loss are NOT emulated"
        line=${line%% netem *}" pfifo limit $QUEUE_PKTS"
        say "  $line"
        err=$($line 2>&1) || die "'$line' failed: $err"
        netem_missing=yes
        continue
      fi
      if [[ $line == *" netem "* ]]; then
        die "netem is not available in this kernel ($err). Load it on the host (sudo modprobe sch_netem;
      on Ubuntu it is in linux-modules-extra-\$(uname -r)), or set LINK_NETEM=off for rate-only shaping"
      fi
      die "'$line' failed: $err"
    fi
    if [[ $line == *" netem "* ]]; then netem_used=yes; fi
  done <<<"$commands"
  {
    echo "uplink_dev=$UP_DEV rate=$UP_RATE delay=$UP_DELAY jitter=$UP_JITTER loss=$UP_LOSS"
    echo "downlink_devs=$DOWN_DEVS rate=$DOWN_RATE delay=$DOWN_DELAY jitter=$DOWN_JITTER loss=$DOWN_LOSS"
    echo "netem=$NETEM netem_used=$netem_used netem_missing=$netem_missing queue_pkts=$QUEUE_PKTS"
  } >"$STATE_DIR/shaped"
  say "shaping applied:"
  for dev in $UP_DEV $DOWN_DEVS; do
    tc qdisc show dev "$dev" | sed "s/^/link:   $dev: /" >&2
  done
}

wait_for_cloud() {
  local deadline=$((SECONDS + WAIT_S))
  until [[ -n $(cloud_ip) ]]; do
    ((SECONDS < deadline)) || die "$CLOUD_HOST did not resolve within ${WAIT_S}s"
    sleep 1
  done
}

health() {
  [[ -f $STATE_DIR/shaped ]] || { echo "shaping not applied"; exit 1; }
  timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$LISTEN_PORT" 2>/dev/null || { echo "relay not listening on $LISTEN_PORT"; exit 1; }
  timeout 3 bash -c "exec 3<>/dev/tcp/$CLOUD_HOST/$CLOUD_PORT" 2>/dev/null || { echo "cloud $CLOUD_HOST:$CLOUD_PORT unreachable"; exit 1; }
  echo "ok: $(tr '\n' ' ' <"$STATE_DIR/shaped")"
}

cmd=${1:-run}
case $cmd in
  plan)
    validate
    find_devices
    plan_all
    ;;
  shape)
    shape
    ;;
  health)
    health
    ;;
  run)
    validate
    wait_for_cloud
    shape
    say "relaying 0.0.0.0:$LISTEN_PORT -> $CLOUD_HOST:$CLOUD_PORT"
    relay=(socat -d TCP4-LISTEN:"$LISTEN_PORT",fork,reuseaddr,backlog=128,nodelay TCP4:"$CLOUD_HOST":"$CLOUD_PORT",nodelay)
    if [[ $(id -u) -eq 0 ]] && command -v setpriv >/dev/null; then
      exec setpriv --reuid=nobody --regid=nogroup --clear-groups "${relay[@]}"
    fi
    exec "${relay[@]}"
    ;;
  *)
    die "unknown command '$cmd' (run, shape, plan or health)"
    ;;
esac
