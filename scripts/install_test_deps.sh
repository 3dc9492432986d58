#!/usr/bin/env bash
# System tools some tests use (they skip, saying why, when a tool is absent):
#   docker-compose  tests/test_deploy.py renders docker-compose.yml with `docker-compose config`
#   prometheus      tests/test_prometheus.py scrapes a real sqs-cloud with /usr/bin/prometheus
#   iproute2        tc, for link shaping (tbf/htb) in tests that use network namespaces
#   cmake, g++      scripts/build_llama_server.sh builds llama-server (tests/test_llama_server.py)
# The Docker engine of the stack tests (tests/test_deploy.py) is scripts/container_engine.sh's job:
# it installs docker.io and debootstrap itself, starts dockerd and builds the local base images.
# Idempotent: installs only what is missing, only as root on a Debian-like system with apt-get.
# Always exits 0: a missing tool makes its tests skip, it does not break `make test`.
set -u

say() { echo "install_test_deps: $*"; }

# package -> a file it provides
declare -A PROVIDES=(
  [docker-compose]=/usr/bin/docker-compose
  [prometheus]=/usr/bin/prometheus
  [iproute2]=/usr/sbin/tc
  [cmake]=/usr/bin/cmake
  [g++]=/usr/bin/g++
)

missing=()
for pkg in docker-compose prometheus iproute2 cmake g++; do
  if [ -x "${PROVIDES[$pkg]}" ] || dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    say "$pkg: present"
  else
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  say "nothing to install"
  exit 0
fi
say "missing: ${missing[*]}"

if ! command -v apt-get >/dev/null 2>&1; then
  say "apt-get not available on this system; not installing (tests needing ${missing[*]} will skip)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  say "not root; not installing (run: sudo apt-get install -y --no-install-recommends ${missing[*]})"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Package lists may be absent in a fresh container: update once if the install cannot find a package.
if ! apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/install_test_deps.log 2>&1; then
  say "apt-get install failed; running apt-get update and retrying"
  if ! { apt-get update >>/tmp/install_test_deps.log 2>&1 &&
         apt-get install -y --no-install-recommends "${missing[@]}" >>/tmp/install_test_deps.log 2>&1; }; then
    say "apt-get could not install ${missing[*]} (see /tmp/install_test_deps.log); the tests needing them will skip"
    tail -n 5 /tmp/install_test_deps.log | sed 's/^/install_test_deps:   /'
    exit 0
  fi
fi
for pkg in "${missing[@]}"; do
  if [ -x "${PROVIDES[$pkg]}" ]; then say "$pkg: installed (${PROVIDES[$pkg]})"; else say "$pkg: install reported success but ${PROVIDES[$pkg]} is absent"; fi
done
exit 0
