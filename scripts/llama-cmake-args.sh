#!/bin/sh
# Prints the CMAKE_ARGS used to build llama-cpp-python on this machine.
#
# A user's own CMAKE_ARGS always wins (e.g. -DGGML_CUDA=on). On x86-64 Linux the default
# -march=native build compiles AMX tile instructions in whenever the CPU advertises AMX. Many
# cloud VMs' kernels do not grant AMX tile data (XTILEDATA) while still answering the permission
# request with success, so ggml takes AMX as usable and the first quantized (Q4_K) matrix multiply
# dies with SIGILL (`tilezero` in ggml_backend_amx_mul_mat). So every instruction set is spelled
# out instead: AVX2, plus each AVX-512 and VNNI extension the CPU has. Elsewhere (macOS: Metal)
# llama.cpp's defaults are right.
#
# Every build has llama.cpp's RPC backend (`llava rpc-server`, `--rpc`), unless the user's own
# CMAKE_ARGS say otherwise about GGML_RPC.
#
# `--portable` prints the AVX2 flags alone, whatever the CPU: `make bench` measures that build too.
set -eu
rpc="-DGGML_RPC=ON"
portable="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
if [ "${1:-}" = --portable ]; then
  printf '%s\n' "$portable $rpc"
  exit 0
fi
if [ -n "${CMAKE_ARGS:-}" ]; then
  case "$CMAKE_ARGS" in
    *GGML_RPC*) printf '%s\n' "$CMAKE_ARGS" ;;
    *) printf '%s\n' "$CMAKE_ARGS $rpc" ;;
  esac
  exit 0
fi
if [ "$(uname -s)" != Linux ]; then
  printf '%s\n' "$rpc"
  exit 0
fi
case "$(uname -m)" in
  x86_64|amd64) ;;
  *) printf '%s\n' "$rpc"; exit 0 ;;
esac
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { case " $flags " in *" $1 "*) return 0 ;; esac; return 1; }
# Each extension only where /proc/cpuinfo names it: AMD EPYC (Zen 4) has AVX-512 VNNI but not
# the VEX-encoded AVX-VNNI, and a build with GGML_AVX_VNNI dies there with SIGILL
# (`{vex} vpdpbusd` in llamafile_sgemm) on the first Q4_K_M matrix multiply.
args=$portable
if has avx512f && has avx512cd && has avx512dq && has avx512bw && has avx512vl; then
  args="$args -DGGML_AVX512=ON"
  has avx512vbmi && args="$args -DGGML_AVX512_VBMI=ON"
  has avx512_vnni && args="$args -DGGML_AVX512_VNNI=ON"
  has avx512_bf16 && args="$args -DGGML_AVX512_BF16=ON"
fi
has avx_vnni && args="$args -DGGML_AVX_VNNI=ON"
printf '%s\n' "$args $rpc"
