"""What the microVM end-to-end tests share: libvirt up, a private copy of the demo image,
summon's config pointed at it and at a libvirt host, and the domains libvirt runs.

Each test module builds its own copy of `images/decks` under /var/tmp (QEMU, running as
libvirt's user, must read the kernel and initrd; pytest's tmp_path is private to root) so
that no test writes into the checkout, and so that a marker in the copy's page proves the
answer came from the VM that copy was built into."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers.paths import REPO
from tests.helpers.summon_proc import Summon

URI = "qemu:///system"

# What a microVM test needs on this machine, named when it is absent (`make test` installs it all)
MISSING = [x for x in ("qemu-system-x86_64", "libvirtd", "virsh") if shutil.which(x) is None]
try:
    import libvirt  # noqa: F401
except ImportError:
    MISSING.append("libvirt-python")
if not list(Path("/boot").glob("vmlinuz-*-cloud-amd64")):
    MISSING.append("linux-image-cloud-amd64")


def vm_marks(timeout_s: int, missing: list[str] = MISSING, hint: str = "") -> list[pytest.MarkDecorator]:
    """A microVM test module's marks: slow, vm, its timeout, skipped naming what is missing."""
    reason = f"not installed: {', '.join(missing)}" + (f" {hint}" if hint else "")
    return [pytest.mark.slow, pytest.mark.vm, pytest.mark.timeout(timeout_s),
            pytest.mark.skipif(bool(missing), reason=reason)]


PROCESS_HOST = '[[host]]\nname = "local"\nbackend = "process"\nslots = 16\n'  # Summon's default


STARTED_DAEMONS: list[int] = []  # PIDs of the libvirt daemons this test run started (conftest stops them)


def libvirt_daemons_up() -> None:
    """Start libvirtd/virtlogd when root and absent, remembering which this run started."""
    import os

    from proxy.backends.libvirt import start_libvirt_daemons

    if os.geteuid() == 0:
        STARTED_DAEMONS.extend(start_libvirt_daemons())


def stop_started_daemons(timeout_s: float = 10.0) -> None:
    """SIGTERM the daemons `libvirt_daemons_up` started, by PID, and wait for them to go."""
    import os
    import signal

    for pid in STARTED_DAEMONS:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while STARTED_DAEMONS and time.monotonic() < deadline:
        try:
            os.kill(STARTED_DAEMONS[-1], 0)
            time.sleep(0.1)
        except ProcessLookupError:
            STARTED_DAEMONS.pop()


def libvirt_up(arch: str | None = None) -> None:
    """Start libvirtd/virtlogd when root and absent; fail (or skip, for a guest arch this
    QEMU cannot run) with libvirt's reason otherwise."""
    from proxy.backends.libvirt import libvirt_available

    libvirt_daemons_up()
    reason = libvirt_available(URI, arch) if arch else libvirt_available(URI)
    if reason is not None and arch and f"cannot run {arch}" in reason:
        pytest.skip(reason)
    assert reason is None, reason


def copy_decks(prefix: str, marker: str | None = None) -> Path:
    """A directory of images holding a copy of decks (no build); with `marker`, the copy's
    index page carries `<!-- marker -->` and its manifest the new content digest."""
    from proxy.images.manifest import content_digest, read_manifest, write_manifest

    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    root.chmod(0o755)
    shutil.copytree(REPO / "images" / "decks", root / "decks", ignore=shutil.ignore_patterns("build"))
    if marker is not None:
        index = root / "decks" / "site" / "index.html"
        index.write_text(index.read_text().replace("</body>", f"<!-- {marker} --></body>"))
        manifest = read_manifest(root / "decks")
        manifest["targets"]["unix"]["content_sha256"] = content_digest(root / "decks" / "site")
        write_manifest(root / "decks", manifest)
    return root


def on_host(s: Summon, images: Path, hosts: str) -> Summon:
    """`s` with its images directory at `images` and `hosts` (TOML) instead of the process host."""
    text = s.config.read_text().replace('dir = "images"', f'dir = "{images}"')
    assert PROCESS_HOST in text, "Summon's default host changed: update PROCESS_HOST"
    s.config.write_text(text.replace(PROCESS_HOST, hosts))
    return s


def summon_domains() -> list[str]:
    """Names of the running domains summon names (`summon-...`), anyone's."""
    out = subprocess.run(["virsh", "-c", URI, "list", "--name"], capture_output=True, text=True, check=True).stdout
    return [n for n in out.split() if n.startswith("summon-")]
