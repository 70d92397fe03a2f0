#!/usr/bin/env bash
# Print the interpreter to build a virtualenv on: $PYTHON when set; else Debian's
# /usr/bin/python3 when it is 3.11 or newer and can make venvs; else `python3`.
# Why: Debian's python3 is built with profile-guided and link-time optimisation; a pyenv
# build made without --enable-optimizations (as on the CI machines, where it comes first
# in PATH) runs summon's per-request path about 25% slower (measured: 25.6 vs 33.6 us
# in-process, 62 vs 74 us of CPU per proxied request).
if [[ -n "${PYTHON:-}" ]]; then
  echo "$PYTHON"
elif /usr/bin/python3 -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo /usr/bin/python3
else
  echo python3
fi
