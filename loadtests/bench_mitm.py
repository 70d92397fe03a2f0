"""`make bench` section "mitm": summon's native front vs summon inside mitmproxy.

Both fronts serve the same static route to the same upstream (nginx, `return 200`), in
the same run, measured with wrk at c1 and c32 in interleaved rounds like the proxy
section (`start_and_measure`); plain mitmproxy
(reverse mode, no addon) runs too, so the addon's own cost can be told from
mitmproxy's. The summon-in-mitmproxy target is

    mitmdump --mode reverse:http://127.0.0.1:1 -s proxy/mitm.py --set summon_config=...

from .venv-mitm (scripts/setup-mitmproxy.sh installs mitmproxy and summon there).

This module does not import bench.py (which imports it to register the section): the
helpers come from the module that defines the `Bench` object it is handed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from bench.py or loaded by a test
import targets as tg  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCIES = [1, 32]


def ensure_mitm_venv(b: Any, bench: Any) -> Path:
    """.venv-mitm with mitmproxy *and* summon (an older .venv-mitm may lack summon)."""
    exe = ROOT / ".venv-mitm" / "bin" / "mitmdump"
    if bench.args.no_install:
        if not exe.exists():
            raise b.TargetUnavailable(f"{exe} not found and --no-install given (run scripts/setup-mitmproxy.sh)")
        return exe
    log = bench.tmp / "setup-mitmproxy.log"
    with open(log, "wb") as f:
        try:
            cp = subprocess.run(["bash", str(ROOT / "scripts" / "setup-mitmproxy.sh")], stdout=f,
                                stderr=subprocess.STDOUT, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            raise b.TargetUnavailable("scripts/setup-mitmproxy.sh took more than 10 minutes") from None
    if cp.returncode != 0 or not exe.exists():
        raise b.TargetUnavailable(f"could not install mitmproxy (scripts/setup-mitmproxy.sh):\n{b.bl.tail(log)}")
    return exe


def start_summon_in_mitmproxy(bench: Any, upstream_port: int) -> tuple[Any, int]:
    b = tg
    exe = ensure_mitm_venv(b, bench)
    host = b.HOST
    port = b.bl.free_port(host)
    d = bench.tmp / "summon-mitm"
    (d / "confdir").mkdir(parents=True, exist_ok=True)
    conf = d / "summon.toml"
    conf.write_text(
        f'[events]\npath = "{d / "events.db"}"\n\n'
        f'[[route]]\nname = "bench"\nhost = "*"\npath = "/"\nupstreams = ["{host}:{upstream_port}"]\n'
    )
    argv = [
        str(exe), "--mode", f"reverse:http://{host}:1",  # a placeholder: the addon picks the upstream
        "--listen-host", host, "--listen-port", str(port),
        "-s", str(ROOT / "proxy" / "mitm.py"),
        "--set", f"summon_config={conf}",
        "--set", f"confdir={d / 'confdir'}",
        "-q",
    ]
    proc = bench.procs.start("summon-mitm", argv, cwd=d)
    if not b.bl.wait_port(host, port, timeout=30, alive=proc.alive):
        alive = proc.alive()
        code = bench.procs.stop(proc)
        state = "did not listen within 30 s" if alive else f"exited with code {code}"
        raise b.TargetUnavailable(f"mitmdump with the summon addon {state}:\n{proc.output_tail()}")
    return proc, port


def section_mitm(bench: Any) -> dict:
    """summon native vs summon in mitmproxy (vs plain mitmproxy), same upstream, same run."""
    b = tg
    mitm_duration = min(bench.duration_s, bench.args.mitm_duration)
    bench.log("mitm: starting the upstream (nginx, return 200)")
    try:
        up_proc, up_port = b.start_upstream(bench)
        b.probe(up_port)
    except b.TargetUnavailable as e:
        raise b.HarnessError(f"the upstream is needed by every target: {e}") from None

    starters: list[tuple[str, Callable[[Any, int], tuple[Any, int]], float]] = [
        ("summon", b.start_summon, bench.duration_s),
        ("summon_mitm", start_summon_in_mitmproxy, mitm_duration),
        ("mitmproxy", b.start_mitmproxy, mitm_duration),
    ]
    targets = b.start_and_measure(bench, "mitm", starters, up_port, CONCURRENCIES)
    if not up_proc.alive():
        raise b.HarnessError(f"the upstream nginx died during the run:\n{up_proc.output_tail()}")
    bench.procs.stop(up_proc)

    def rps(target: str, c: int) -> float | None:
        return b.figure(targets, target, c, "requests_per_s")

    figures = {
        "summon_over_summon_mitm_rps_c32": b.bl.ratio(rps("summon", 32), rps("summon_mitm", 32)),
        "summon_over_summon_mitm_rps_c1": b.bl.ratio(rps("summon", 1), rps("summon_mitm", 1)),
        "summon_mitm_over_mitmproxy_rps_c32": b.bl.ratio(rps("summon_mitm", 32), rps("mitmproxy", 32)),
        "summon_mitm_added_p50_ms_c1": b.bl.difference(
            b.figure(targets, "summon_mitm", 1, "p50_ms"), b.figure(targets, "mitmproxy", 1, "p50_ms")
        ),
    }
    print_table(b, targets, figures)
    return {
        "settings": {
            "duration_s": bench.duration_s,
            "mitmproxy_duration_s": mitm_duration,
            "warmup_s": bench.warmup_s,
            "repeat": bench.args.repeat,
            "wrk_threads": 1,
            "concurrencies": CONCURRENCIES,
            "route": "static upstream (one nginx, return 200)",
        },
        "targets": targets,
        "figures": figures,
    }


def print_table(b: Any, targets: dict, figures: dict) -> None:
    b.print_targets_table(targets, CONCURRENCIES, width=12)
    labels = {
        "summon_over_summon_mitm_rps_c32": "summon native / summon-in-mitmproxy req/s, c32",
        "summon_over_summon_mitm_rps_c1": "summon native / summon-in-mitmproxy req/s, c1",
        "summon_mitm_over_mitmproxy_rps_c32": "summon-in-mitmproxy / plain mitmproxy req/s, c32",
        "summon_mitm_added_p50_ms_c1": "addon's added p50 over plain mitmproxy, c1 (ms)",
    }
    for key, value in figures.items():
        print(f"{labels[key]:<52} {b.fmt(value, 3):>8}")
    print()
