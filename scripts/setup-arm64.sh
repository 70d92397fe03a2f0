#!/usr/bin/env bash
# What an arm64 microVM needs beyond scripts/setup.sh, run only by `make image-arm64`:
# dpkg's arm64 architecture (so apt can fetch linux-image-*-cloud-arm64 and busybox-static
# for arm64; the build unpacks them, installs nothing) and qemu-system-aarch64.
#   SUMMON_SKIP_APT=1 ...  change nothing; say what is missing
set -euo pipefail
need=()
dpkg --print-foreign-architectures | grep -qx arm64 || need+=("dpkg --add-architecture arm64")
dpkg-query -W -f='${Status}' qemu-system-arm 2>/dev/null | grep -q "install ok installed" || need+=("qemu-system-arm")
((${#need[@]})) || exit 0
if [[ "${SUMMON_SKIP_APT:-}" == 1 || $(id -u) -ne 0 ]]; then
  echo "setup-arm64: as root, do: ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
apt-get update -qq
apt-get install -y -qq --no-install-recommends qemu-system-arm >/tmp/summon-apt-arm64.log 2>&1 \
  || { tail -20 /tmp/summon-apt-arm64.log; echo "setup-arm64: apt-get install failed" >&2; exit 1; }
