#!/usr/bin/env bash
# Install one locked environment: install-env.sh VENV LOCK PACKAGE_DIR...
#
# The lock is the only source of versions. uv (pinned below, installed into .tools/uv) does the
# work in seconds; when uv cannot be had, pip installs the same lock. uv reads neither pip's
# configuration nor PIP_* variables, so the find-links folders and extra indexes that pip is
# configured with on this machine are passed on to it: a machine's local wheels (such as a CPU
# build of torch) are found by both installers alike.
#
# torch: the trainer lock pins a CPU build (`+cpu`). When no configured find-links folder holds
# that wheel, uv is asked for its CPU torch backend (`--torch-backend cpu`), which installs the
# CPU build from the PyTorch project's own index instead of the multi-GB CUDA build on PyPI.
#
# Bytecode: both installers compile every module they install (uv with --compile-bytecode, pip by
# default); an environment made before that (no .bytecode-compiled marker) is compiled once with
# compileall; the project's own packages are compiled last. Where PYTHONDONTWRITEBYTECODE is set,
# Python never writes .pyc files itself, so without this every stage process would compile
# torch, transformers and trl again on import (about 12 s instead of 5 s each).
set -euo pipefail

UV_VERSION=0.13.8
PYTHON=${PYTHON:-python3}
venv=$1
lock=$2
shift 2
packages=("$@")

root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.tools/uv"

pip_config() {  # values of one pip setting, one per line (pip's own config files and PIP_* vars)
  "$PYTHON" -m pip config list 2>/dev/null | sed -n "s/^[a-z:.]*${1}='\(.*\)'$/\1/p" | tr ' ' '\n' | sed '/^$/d'
}

ensure_uv() {
  if [ -x "$tools/bin/uv" ] && "$tools/bin/uv" --version 2>/dev/null | grep -q " $UV_VERSION"; then
    return 0
  fi
  rm -rf "$tools"
  "$PYTHON" -m venv "$tools" >/dev/null 2>&1 &&
    "$tools/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" >/dev/null 2>&1
}

install_with_uv() {
  local uv="$tools/bin/uv" args=() link index
  while IFS= read -r link; do args+=(--find-links "$link"); done < <(pip_config find-links)
  while IFS= read -r index; do args+=(--extra-index-url "$index"); done < <(pip_config extra-index-url)
  while IFS= read -r index; do args+=(--index-url "$index"); done < <(pip_config index-url | tail -n 1)
  # pip picks the best version across all indexes; uv does the same only when told so.
  args+=(--index-strategy unsafe-best-match)
  if grep -q '^torch==.*+cpu' "$lock" && ! has_local_torch_wheel; then
    args+=(--torch-backend cpu)
  fi
  [ -x "$venv/bin/python" ] || "$uv" venv -q --seed --python "$PYTHON" "$venv"
  "$uv" pip install -q --compile-bytecode --python "$venv/bin/python" "${args[@]}" -r "$lock"
  if [ ${#packages[@]} -gt 0 ]; then
    "$uv" pip install -q --python "$venv/bin/python" --no-deps "${packages[@]/#/-e}"
  fi
}

has_local_torch_wheel() {
  local version link
  version=$(sed -n 's/^torch==\(.*\)$/\1/p' "$lock")
  while IFS= read -r link; do
    link=${link#file://}
    compgen -G "$link/torch-${version}-*.whl" >/dev/null && return 0
  done < <(pip_config find-links)
  return 1
}

install_with_pip() {
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$lock" 2>&1 |
    { grep -v -e '^WARNING: Location' -e 'is neither a file nor a directory' || true; }
  if [ ${#packages[@]} -gt 0 ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${packages[@]/#/-e}"
  fi
}

new_venv=1
[ -x "$venv/bin/python" ] && new_venv=0
if [ "${FACIAL_R1_INSTALLER:-uv}" = uv ] && ensure_uv; then
  install_with_uv
else
  echo "install-env: uv $UV_VERSION unavailable; installing $lock with pip (slower)" >&2
  install_with_pip
fi
marker="$venv/.bytecode-compiled"
if [ "$new_venv" = 0 ] && [ ! -e "$marker" ]; then
  echo "install-env: compiling the bytecode of $venv once (made before installs compiled it)" >&2
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$venv/bin/python" -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true
fi
touch "$marker"
for package in "${packages[@]}"; do
  "$venv/bin/python" -m compileall -q "$package/src" >/dev/null
done
