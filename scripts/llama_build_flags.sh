#!/usr/bin/env bash
# The cmake flags both llama.cpp builds of this project use (the llama-cpp-python wheel of
# scripts/build_llama_wheel.sh, llama-server of scripts/build_llama_server.sh), and the cache key
# they are kept under. Sourced, not run: sets LLAMA_CMAKE_FLAGS (an array), LLAMA_CFLAGS and LLAMA_FLAGS_KEY.
#
# Native (GGML_NATIVE: this CPU's flags), without AMX unless SQS_LLAMA_AMX=1. ggml's AMX kernels
# die on the AMX VMs we have had (SIGSEGV on one, SIGILL at `tilezero` in ggml_backend_amx_mul_mat
# on the next: a tile config ggml loads once per thread is gone when it is used), and with them
# llama.cpp's other extra buffer type, the runtime repack, had to go too (use_extra_bufts = false,
# llama-server --no-repack). Built without AMX, the repack runs: on the Xeon of docs/RESULTS.md
# section 0i a 1.5B Q4_K_M pass of 4-16 rows costs 0.56-0.77x of the unrepacked one. GCC lets
# -mno-amx-* win over -march=native whatever their order.
FLAGS="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_bf16|avx512_vnni|amx_tile|amx_bf16)$' | sort | tr '\n' '-')"
# LLAMA_CFLAGS goes to the compiler through CFLAGS / CXXFLAGS (cmake reads them at the first
# configure), so no build tool has to split a quoted CMAKE_ARGS.
LLAMA_CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON)
if [[ "${SQS_LLAMA_AMX:-0}" == 1 ]]; then
    LLAMA_CFLAGS=""
    LLAMA_FLAGS_KEY="${FLAGS%-}"
else
    LLAMA_CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    LLAMA_FLAGS_KEY="${FLAGS%-}-noamx"
fi
