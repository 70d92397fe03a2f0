#!/usr/bin/env bash
# Install everything summon needs on a fresh Debian machine: Debian packages (when
# root), a virtualenv in .venv with the project and its dev tools, and the libvirt
# daemons started by hand (these machines have no systemd).
#   scripts/setup.sh           core + test tools
#   scripts/setup.sh --arm64   also what an arm64 microVM needs (scripts/setup-arm64.sh):
#                              `make test` asks for it, tests/e2e/test_vm_arm64.py boots one
#   SUMMON_SKIP_APT=1 ...      do not touch Debian packages
set -euo pipefail
cd "$(dirname "$0")/.."
arm64=0
for arg in "$@"; do
  case "$arg" in
    --arm64) arm64=1 ;;
    *) echo "setup: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

DEB_PACKAGES=(
  busybox-static          # httpd for the demo site, and /init of the microVM
  nginx-light             # the reference reverse proxy in `make bench`; a host proxy of the plugin tests (has auth_request)
  libnginx-mod-http-lua lua-resty-core lua-resty-lrucache # nginx's Lua module: plugins/nginx/summon-lua.conf (keep-alive to instances)
  caddy                   # a host proxy of the plugin tests (plugins/caddy)
  haproxy                 # a host proxy of the plugin tests (plugins/haproxy, Lua)
  wrk                     # load generator for `make bench`
  qemu-system-x86         # runs the microVMs (KVM where it works, TCG otherwise)
  libvirt-daemon-system   # libvirtd + virtlogd
  libvirt-clients         # virsh, to look at what summon started
  libvirt-dev pkg-config  # to build libvirt-python
  linux-image-cloud-amd64 # a small virtio kernel for the microVM
  lz4                     # unpacks that kernel (LZ4 inside its bzImage) for a PVH boot
  linux-source-6.1        # the minimal microVM kernel's source (`summon images build --kernel minimal`)
  gcc make bc flex bison libelf-dev # compiling it: Kconfig's parser (flex, bison), timeconst (bc), objtool (libelf)
  cpio                    # initramfs packing
  chromium                # browser tests (headless)
  chromium-headless-shell # the page bench's browser: the same engine, a fraction of the CPU per load
  redis-server            # shared state where an issue asks for it
  python3-venv python3-dev # venvs on Debian's own python3 (scripts/pick-python.sh), headers for libvirt-python
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  [[ "$p" == *"#"* ]] && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ "${SUMMON_SKIP_APT:-}" == 1 ]]; then
    echo "setup: skipping apt-get; missing: ${missing[*]}" >&2
  elif [[ $(id -u) -eq 0 && -x /usr/bin/apt-get ]]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || { echo "setup: apt-get update failed" >&2; exit 1; }
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/summon-apt.log 2>&1 \
      || { tail -20 /tmp/summon-apt.log; echo "setup: apt-get install failed" >&2; exit 1; }
  else
    echo "setup: not root or not Debian: install these yourself: ${missing[*]}" >&2
  fi
fi
if ((arm64)); then
  # 3: missing and not ours to install (as with the packages above: said, and the arm64
  # tests skip naming it); any other failure ends setup: setup-arm64 has named the step
  rc=0
  bash scripts/setup-arm64.sh || rc=$?
  if ((rc == 3)); then
    echo "setup: the arm64 tests will be skipped" >&2
  elif ((rc != 0)); then
    exit "$rc"
  fi
fi

PY=$(bash scripts/pick-python.sh)  # Debian's optimised build when there is one: see there
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
else
  have=$(.venv/bin/python -c 'import os, sys; print(os.path.realpath(sys._base_executable))')
  want=$("$PY" -c 'import os, sys; print(os.path.realpath(sys.executable))' 2>/dev/null || echo "$PY")
  if [[ "$have" != "$want" ]]; then
    echo "setup: note: .venv runs on $have, not $want: rm -rf .venv and run this again to rebuild it" >&2
  fi
fi
extras="dev"
if pkg-config --exists libvirt 2>/dev/null; then extras="$extras,libvirt"; fi
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-$extras"
if [[ ! -f "$stamp" ]]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e ".[$extras]"
  touch "$stamp"
fi
