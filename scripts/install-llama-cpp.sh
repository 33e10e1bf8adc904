#!/bin/sh
# Installs llama-cpp-python into the given virtual environment, built from source with the flags
# from llama-cmake-args.sh. Built wheels are kept in a cache keyed by version, Python and flags:
# pip's own wheel cache ignores CMAKE_ARGS, so it could hand back a wheel built with other flags
# (for instance an AMX-enabled one).
set -eu
venv=$1
version=$2
here=$(dirname "$0")
args=$("$here/llama-cmake-args.sh")
py="$venv/bin/python"
tag=$("$py" -c 'import sys, platform; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")')
key=$(printf '%s|%s|%s' "$version" "$tag" "$args" | sha256sum | cut -c1-16)
cache=${LLAVA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llava-cli/wheels}/$key
if ! ls "$cache"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
  echo "Building llama-cpp-python $version from source (a few minutes, once per machine)" >&2
  echo "  CMAKE_ARGS=${args:-<llama.cpp defaults>}" >&2
  mkdir -p "$cache.tmp"
  CMAKE_ARGS="$args" "$py" -m pip wheel --no-deps --no-cache-dir -w "$cache.tmp" "llama-cpp-python==$version"
  rm -rf "$cache" && mv "$cache.tmp" "$cache"
fi
# --force-reinstall: a venv that holds the same version built with other flags gets this build
"$py" -m pip install --no-deps --force-reinstall "$cache"/llama_cpp_python-"$version"-*.whl
