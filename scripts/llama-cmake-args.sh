#!/bin/sh
# Prints the CMAKE_ARGS used to build llama-cpp-python on this machine.
#
# A user's own CMAKE_ARGS always wins (e.g. -DGGML_CUDA=on). On x86-64 Linux the default
# -march=native build compiles AMX tile instructions in, which crash with SIGILL on VMs whose
# kernel does not grant AMX tile data (see shared/BUILD.md), so every instruction set is spelled
# out instead: AVX-512 where the CPU has it, else a portable AVX2 build. Elsewhere (macOS: Metal)
# llama.cpp's defaults are right.
set -eu
if [ -n "${CMAKE_ARGS:-}" ]; then
  printf '%s\n' "$CMAKE_ARGS"
  exit 0
fi
if [ "$(uname -s)" != Linux ]; then
  exit 0
fi
case "$(uname -m)" in
  x86_64|amd64) ;;
  *) exit 0 ;;
esac
portable="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { case " $flags " in *" $1 "*) return 0 ;; esac; return 1; }
if has avx512f && has avx512bw && has avx512vl && has avx512_vnni && has avx512_bf16; then
  printf '%s\n' "$portable -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
else
  printf '%s\n' "$portable"
fi
