#!/usr/bin/env bash
# Create or refresh .venv with the project and the given extras (e.g. "test,aot").
# Re-runs pip only when pyproject.toml or the extras change.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "gptoss-jax needs Python >= 3.11" >&2; exit 1; }
  "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=".venv/.gptoss-jax-installed"
want="$(sha256sum pyproject.toml | cut -c1-16) [$extras]"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
  spec="."
  [ -n "$extras" ] && spec=".[$extras]"
  .venv/bin/python -m pip install -q -e "$spec"
  if [[ ",$extras," == *",test,"* ]]; then
    # OpenAI's reference implementation (gpt_oss.torch) is a test oracle; its wheel declares
    # Python >= 3.12 but the torch reference runs on 3.11, so it is installed without its deps.
    .venv/bin/python -m pip install -q --no-deps --ignore-requires-python "gpt-oss==0.0.9"
  fi
  echo "$want" >> "$stamp"
fi
