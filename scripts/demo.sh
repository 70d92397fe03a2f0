#!/usr/bin/env bash
# `make demo`: serve the demo site (images/decks) through summon, with instances
# summoned on the first request. Uses real microVMs through libvirt where this machine
# can run them, and the process backend (busybox httpd as a child process) otherwise.
#   SUMMON_BACKEND=process make demo    force the process backend
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
SUMMON=.venv/bin/summon
mkdir -p var

backend="${SUMMON_BACKEND:-auto}"
why=""
# the libvirt daemons this demo starts (not those already running): stopped, by PID, when it ends
started=()
for d in virtlogd libvirtd; do pgrep -x "$d" >/dev/null || started+=("$d"); done
stop_started() {
  local pids=() pid
  for d in "${started[@]}"; do
    if [[ -f /run/$d.pid ]] && pgrep -x "$d" >/dev/null; then pids+=("$(cat "/run/$d.pid")"); fi
  done
  ((${#pids[@]})) || return 0
  kill "${pids[@]}" 2>/dev/null || true
  local alive
  for _ in $(seq 100); do  # gone before `make demo` returns: a `make test` right after starts its own
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
}
if [[ "$backend" == auto ]]; then
  backend=process
  if [[ $(id -u) -ne 0 ]]; then why="not root (libvirt's qemu:///system needs it)"
  elif ! command -v qemu-system-x86_64 >/dev/null; then why="qemu-system-x86 is not installed"
  elif ! $PY -c "import libvirt" 2>/dev/null; then why="libvirt-python is not installed"
  elif ! bash scripts/start-libvirt.sh; then why="libvirtd could not be started"
  else backend=libvirt
  fi
fi

config=summon.toml
if [[ "$backend" == libvirt ]]; then
  echo "demo: building the decks microVM (kernel + initramfs)..."
  $SUMMON images build decks
  config=var/demo-libvirt.toml
  sed -e 's|^include = \["routes/demo.toml"\]|include = ["../routes/demo-vm.toml"]|' \
      -e 's|^backend = "process"|backend = "libvirt"\nuri = "qemu:///system"|' \
      -e 's|^dir = "images"|dir = "../images"|' \
      -e 's|^path = "var/events.db"|path = "events.db"|' summon.toml > "$config"
  echo "demo: using the libvirt backend (real microVMs; domain type kvm if it boots here, else qemu/TCG)"
  echo "demo: watch them come and go with: virsh -c qemu:///system list"
else
  echo "demo: using the process backend${why:+ ($why)}"
fi
$SUMMON check -c "$config"
cat <<MSG

  summon is starting. Open  http://127.0.0.1:8080/        (the first request summons an instance)
  dashboard:                http://127.0.0.1:8081/
  status / events:          $SUMMON status -c $config   |   $SUMMON log -c $config
  Ctrl-C drains and stops every instance.

MSG
if [[ "$backend" == libvirt && "${SUMMON_BACKEND:-auto}" == auto ]]; then  # start-libvirt.sh ran
  trap stop_started EXIT  # after summon has drained and stopped its VMs (Ctrl-C reaches it first)
  $SUMMON serve -c "$config" --log-format text
else
  exec $SUMMON serve -c "$config" --log-format text
fi
