"""Bootstrap shared by both fronts: one driver per host, and a started summoner.

The native server (`proxy.serve.server`) and the mitmproxy addon (`proxy.mitm`) both call
these, so the addon needs nothing of the serving process (sockets, workers, the admin API).
"""

from __future__ import annotations

import logging

from ..backends.base import Backend
from ..backends.owner import claim, owners_dir
from ..backends.process import ProcessBackend
from ..cluster.store import Store
from ..config import Config, key_line
from ..errors import BackendError, ConfigError, HostUnavailable, Problem
from ..observe.events import EventLog
from .summoner import Summoner

log = logging.getLogger("summon.bootstrap")


def make_backends(config: Config) -> dict[str, Backend]:
    """One driver per host; hosts sharing a libvirt URI share its connection."""
    backends: dict[str, Backend] = {}
    by_uri: dict[tuple[str, bool, str, tuple[int, int]], Backend] = {}
    process: Backend | None = None
    owner_dir = owners_dir(config.events_path)
    try:
        claim(owner_dir)  # this process's owner lock, held for its life (proxy.backends.owner)
    except BackendError as exc:  # beside the event log: a problem of [events] path
        raise ConfigError([Problem(config.path, key_line(config.path, "events", 0, "path"),
                                   f"[events].path: {exc.detail}")]) from exc
    for i, host in enumerate(config.hosts):
        if host.backend == "process":
            process = process or ProcessBackend(owner_dir=owner_dir)
            backends[host.name] = process
        elif host.backend == "libvirt":
            key = (host.uri, host.kvm_probe, host.address, host.ports)
            if key not in by_uri:
                from ..backends.libvirt import LibvirtBackend

                try:
                    by_uri[key] = LibvirtBackend(host.uri, probe_kvm=host.kvm_probe, address=host.address,
                                                 ports=host.ports, owner_dir=owner_dir)
                except HostUnavailable as exc:  # libvirt-python missing: `summon check` says the same
                    raise ConfigError([Problem(config.path, key_line(config.path, "host", i, "backend"),
                                               f"[[host]] {host.name}: {exc.detail}")]) from exc
            backends[host.name] = by_uri[key]
        else:
            from ..backends.fake import FakeBackend

            backends[host.name] = FakeBackend()
    return backends


async def start_summoner(config: Config, events: EventLog, backends: dict[str, Backend],
                         store: Store | None = None) -> Summoner:
    """The summoner both fronts use: reap what an earlier run left behind, then tick.
    `store`: the fleet's shared state when this engine is one of several."""
    summoner = Summoner(config, events, backends, store=store,
                        local_share=config.cluster.local_share if config.cluster is not None else 1)
    await summoner.reap_orphans("startup")
    summoner.start()  # and again every REAP_INTERVAL_S
    return summoner
