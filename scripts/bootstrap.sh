#!/usr/bin/env bash
# Sets up a fresh machine for multifd: system packages (as root on Debian: QEMU 10, libqatzip),
# the virtualenv .venv, the core, every plugin in plugins/ and the example plugin, editable.
# Idempotent: a re-run reinstalls only when a pyproject.toml, or a plugin's setup.py or C
# source (plugins/pagecodec: an editable install compiles it once), changed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

bash scripts/setup-system.sh

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi

stamp=.venv/.multifd-installed
want=$(cat pyproject.toml plugins/*/pyproject.toml examples/*/pyproject.toml \
  plugins/*/setup.py plugins/*/*/_build.py plugins/*/*/*.[ch] 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  args=(-e ".[test,bench]")
  for d in plugins/*/ examples/*/; do
    [ -f "$d/pyproject.toml" ] && args+=(-e "$d")
  done
  .venv/bin/python -m pip install -q "${args[@]}" ruff atheris pytest-timeout 2>&1 | grep -v -e '^WARNING: Location' -e 'is ignored' || true
  echo "$want" > "$stamp"
fi
