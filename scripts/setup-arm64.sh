#!/usr/bin/env bash
# What an arm64 microVM needs beyond scripts/setup.sh's packages, run by `make image-arm64`
# and by `make test` (through `scripts/setup.sh --arm64`: tests/e2e/test_vm_arm64.py boots
# one): dpkg's arm64 architecture and apt's lists for it (so the build can `apt-get download`
# linux-image-*-cloud-arm64 and busybox-static for arm64; it unpacks them, installs nothing)
# and qemu-system-aarch64. Does nothing when all of that is already here.
#   SUMMON_SKIP_APT=1 ...  change nothing; say what is missing (exit 3 if anything is)
# Exit status: 0 all there, 3 something missing that this user cannot install (not root,
# no apt-get, or SUMMON_SKIP_APT), 1 an install step failed (named on stderr).
set -euo pipefail
need=()
if ! dpkg --print-foreign-architectures 2>/dev/null | grep -qx arm64; then
  need+=("dpkg --add-architecture arm64" "apt-get update")
elif ! apt-cache show linux-image-cloud-arm64:arm64 busybox-static:arm64 >/dev/null 2>&1; then
  need+=("apt-get update")  # the architecture was added but apt has no arm64 lists yet
fi
dpkg-query -W -f='${Status}' qemu-system-arm 2>/dev/null | grep -q "install ok installed" \
  || need+=("apt-get install qemu-system-arm")
((${#need[@]})) || exit 0
if [[ "${SUMMON_SKIP_APT:-}" == 1 || $(id -u) -ne 0 || ! -x /usr/bin/apt-get ]]; then
  printf -v todo '%s; ' "${need[@]}"
  echo "setup-arm64: as root on Debian, do: ${todo%; }" >&2
  exit 3
fi
export DEBIAN_FRONTEND=noninteractive
log=/tmp/summon-apt-arm64.log
fail() { tail -20 "$log" >&2; echo "setup-arm64: $1 failed (log: $log)" >&2; exit 1; }
: >"$log"
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "setup-arm64: dpkg --add-architecture arm64"
  dpkg --add-architecture arm64 >>"$log" 2>&1 || fail "dpkg --add-architecture arm64"
fi
echo "setup-arm64: apt-get update (arm64 lists)"
apt-get update -qq >>"$log" 2>&1 || fail "apt-get update"
apt-cache show linux-image-cloud-arm64:arm64 busybox-static:arm64 >/dev/null 2>>"$log" \
  || fail "apt-get update (apt still knows no linux-image-cloud-arm64:arm64 or busybox-static:arm64: does the mirror carry arm64?)"
if ! dpkg-query -W -f='${Status}' qemu-system-arm 2>/dev/null | grep -q "install ok installed"; then
  echo "setup-arm64: apt-get install qemu-system-arm"
  apt-get install -y -qq --no-install-recommends qemu-system-arm >>"$log" 2>&1 \
    || fail "apt-get install qemu-system-arm"
fi
