#!/usr/bin/env bash
# Install mitmproxy into its own virtualenv, .venv-mitm, so that mitmproxy's pinned
# dependencies never constrain the core .venv. Idempotent: does nothing when
# .venv-mitm/bin/mitmdump already runs.
#   scripts/setup-mitmproxy.sh        -> .venv-mitm/bin/mitmdump
#   PYTHON=python3.12 scripts/...      choose the interpreter for the venv
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-mitm
MITMDUMP="$VENV/bin/mitmdump"

if [[ -x "$MITMDUMP" ]] && "$MITMDUMP" --version >/dev/null 2>&1; then
  exit 0
fi

PY=${PYTHON:-python3}
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup-mitmproxy: creating $VENV"
  "$PY" -m venv "$VENV"
fi
echo "setup-mitmproxy: installing mitmproxy into $VENV"
"$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/pip" install -q mitmproxy
"$MITMDUMP" --version | head -1
