#!/usr/bin/env bash
# Install mitmproxy into its own virtualenv, .venv-mitm, together with summon itself
# (editable, `.[mitmproxy]`) and pytest, so that:
#   - mitmproxy's pinned dependencies never constrain the core .venv (mitmproxy 11.0.2,
#     the newest release for Python 3.11, pins h11<=0.14.0, wsproto<=1.2.0, flask<=3.1.0,
#     msgpack<=1.1.0, pyparsing<=3.2.0 and Brotli<=1.1.0, which would downgrade the
#     core's and the dev tools' versions);
#   - `mitmdump -s proxy/mitm.py` can import the `proxy` package (the summon addon);
#   - tests/integration/test_mitm.py runs its taddons/tflow tests under this venv's python.
# Idempotent: does nothing when everything is installed for the current pyproject.toml.
#   scripts/setup-mitmproxy.sh        -> .venv-mitm/bin/mitmdump
#   PYTHON=python3.12 scripts/...      choose the interpreter for the venv
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-mitm
MITMDUMP="$VENV/bin/mitmdump"
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"

if [[ -f "$stamp" && -x "$MITMDUMP" ]] && "$MITMDUMP" --version >/dev/null 2>&1; then
  exit 0
fi

PY=$(bash scripts/pick-python.sh)  # the same interpreter as .venv, so benchmarks compare like with like
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup-mitmproxy: creating $VENV"
  "$PY" -m venv "$VENV"
fi
echo "setup-mitmproxy: installing mitmproxy and summon into $VENV"
"$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "$VENV/bin/pip" install -q -e ".[mitmproxy]" "pytest>=8" "pytest-timeout>=2.3" >"$log" 2>&1; then
  tail -30 "$log" >&2
  echo "setup-mitmproxy: pip install failed" >&2
  exit 1
fi
version=$("$MITMDUMP" --version)  # not `| head -1`: mitmdump dies of SIGPIPE, and pipefail fails us
echo "${version%%$'\n'*}"
rm -f "$VENV"/.installed-*
touch "$stamp"
