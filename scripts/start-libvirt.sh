#!/usr/bin/env bash
# Start virtlogd and libvirtd if they are not running (these machines have no systemd).
# Idempotent; stops nothing. Waits until libvirtd's socket answers.
set -euo pipefail
for d in virtlogd libvirtd; do
  if ! pgrep -x "$d" >/dev/null; then
    command -v "$d" >/dev/null || { echo "start-libvirt: $d not installed (apt-get install libvirt-daemon-system)" >&2; exit 1; }
    "$d" -d
    echo "start-libvirt: started $d"
  fi
done
for _ in $(seq 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.1
done
echo "start-libvirt: libvirtd does not answer on qemu:///system" >&2
exit 1
