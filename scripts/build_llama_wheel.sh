#!/usr/bin/env bash
# Build the llama-cpp-python wheel (the llama engine, pyproject extra `llama`) once per version and
# build flags into a cache of wheels, and install it into the given pip's environment. The flags are
# those of scripts/llama_build_flags.sh (native, AMX off unless SQS_LLAMA_AMX=1), the same as
# llama-server's, so both sides of a comparison run the same kernels.
#
# Not pip's own wheel cache: it keys a built wheel by the sdist alone, so a wheel built with other
# flags (an earlier install, before AMX was turned off) would be reused.
# Cold: 6-8 min on 2 cores (the sdist compiles llama.cpp); warm: the cached wheel installs in seconds.
#
#   scripts/build_llama_wheel.sh .venv/bin/pip
set -euo pipefail
PIP="${1:?usage: $0 PIP}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
source "$(dirname "$0")/llama_build_flags.sh"
WHEELS="${SQS_LLAMA_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/sqs-sd/wheels}/llama-cpp-python-$VERSION-$LLAMA_FLAGS_KEY"

if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    command -v cmake >/dev/null || echo "build_llama_wheel: no cmake on PATH; pip's build isolation brings one" >&2
    echo "build_llama_wheel: building llama-cpp-python $VERSION ($LLAMA_FLAGS_KEY): 6-8 min on 2 cores, once" >&2
    start=$(date +%s)
    mkdir -p "$WHEELS.tmp"
    CFLAGS="$LLAMA_CFLAGS" CXXFLAGS="$LLAMA_CFLAGS" CMAKE_ARGS="${LLAMA_CMAKE_FLAGS[*]}" "$PIP" wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
        -w "$WHEELS.tmp" "llama-cpp-python==$VERSION"
    rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
    echo "build_llama_wheel: built in $(( $(date +%s) - start )) s" >&2
fi
"$PIP" install -q --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl
