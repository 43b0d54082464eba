#!/usr/bin/env bash
# Sets up a fresh machine for multifd: system packages (as root on Debian: QEMU 10, libqatzip),
# the virtualenv .venv, the core, every plugin in plugins/ and the example plugin, editable.
# Idempotent: a re-run reinstalls only when a pyproject.toml, or a plugin's setup.py or C
# source (plugins/pagecodec: an editable install compiles it once), changed.
# Quiet: the details (apt, pip, the compilers) go to .cache/setup.log; the last line printed
# says what is in place and names that file. On failure, the log's tail and its path.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
mkdir -p .cache
log="$here/.cache/setup.log"
started=$(date +%s)
: >"$log"
failed() {
  echo "set-up failed; the end of $log:" >&2
  tail -25 "$log" | sed 's/^/  /' >&2
  echo "set-up failed (details: $log)" >&2
  exit 1
}

stamp=.venv/.multifd-installed
want=$(cat pyproject.toml plugins/*/pyproject.toml examples/*/pyproject.toml \
  plugins/*/setup.py plugins/*/*/_build.py plugins/*/*/*.[ch] 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "set-up: installing system packages and .venv (the first run takes minutes; details: $log)"
fi

{ echo "== scripts/setup-system.sh"; bash scripts/setup-system.sh; } >>"$log" 2>&1 || failed

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  { echo "== .venv"; "$py" -m venv .venv && .venv/bin/python -m pip install --upgrade pip; } \
    >>"$log" 2>&1 || failed
fi

state=unchanged
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  args=(-e ".[test,bench]")
  for d in plugins/*/ examples/*/; do
    [ -f "$d/pyproject.toml" ] && args+=(-e "$d")
  done
  { echo "== pip install ${args[*]} ruff==0.17.6 atheris pytest-timeout"
    .venv/bin/python -m pip install "${args[@]}" "ruff==0.17.6" atheris pytest-timeout; } >>"$log" 2>&1 \
    || failed
  echo "$want" > "$stamp"
  state=installed
fi

# The editable installs run this checkout's sources: compile them, as pip does for a wheel
# (with PYTHONDONTWRITEBYTECODE set, every command would compile them again: ~40 ms a start).
# Only stale files are recompiled.
.venv/bin/python -m compileall -q -j 0 multifd_core plugins examples benchmarks >>"$log" 2>&1 \
  || true

# One line: what is in place, and where the details are.
qemu=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9.]*\).*/QEMU \1/p' | head -1)
qz=$(ls .cache/qatzip/usr/lib/*/libqatzip.so.3* /usr/lib/*/libqatzip.so.3* 2>/dev/null | head -1 || true)
pc=$(.venv/bin/python -c "import multifd_pagecodec as p; print('pagecodec ' + ('built' if p.AVAILABLE else 'NOT built'))" 2>/dev/null || echo "pagecodec missing")
root=""
grep -q '^setup-system: not root' "$log" && root="; not root: system packages left as they are"
echo "set-up: ${qemu:-QEMU missing}, ${qz:+libqatzip, }$pc; .venv $state (core and" \
  "$(ls -d plugins/*/ examples/*/ | wc -l) plugin distributions) in" \
  "$(( $(date +%s) - started )) s$root; details: $log"
