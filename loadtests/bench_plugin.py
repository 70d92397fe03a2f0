"""The `plugin` section of `make bench`: summon as nginx's plugin, next to summon native and
nginx alone, all to the same static upstream (an nginx answering 200).

Targets, started once and measured in interleaved rounds (targets.measure_rounds: wrk
-t1 at c1 and c32, `--repeat` rounds, medians; a drift of these shared machines falls
on every target alike):
- `nginx`: nginx alone as reverse proxy (the proxy section's config: an upstream{} block
  with keep-alive connections);
- `nginx_var`: nginx alone with `proxy_pass http://$var`, the variable set to the
  upstream's address: what the plugin's `proxy_pass http://$summon_upstream` costs by
  itself. nginx (open source, 1.22) keeps no connections to an address it only learns
  per request, so each request opens and closes one: this, not the decision, is what
  bounds nginx + plugin;
- `summon`: summon native, one worker, a static route to the upstream;
- `plugin`: nginx with the shipped plugins/nginx/summon.conf (only the listen port, the
  plugin's address and the cache path changed) in front of that same summon's decision
  endpoint. The route is static, so it is steady and nginx reuses each decision for
  `[plugin] cache` (1 s): what a warm, steady pool gets;
- `plugin_nocache`: the same config without its three proxy_cache lines and
  X-Summon-Cache, so every request asks /decide and calls /done: what a pool that may
  still scale out gets;
- `plugin_lua`, `plugin_lua_nocache`: the same two with plugins/nginx/summon-lua.conf
  (Debian's Lua module loaded): the decided instance is reached through an upstream{}
  whose peer balancer_by_lua sets, with `keepalive`, so connections to it are reused,
  and a reusable decision is kept in the worker's memory (lua-resty-lrucache), not in
  proxy_cache's files; `_nocache` without its X-Summon-Cache line. Skipped when the
  module is not installed.
Figures: req/s at c32 of each over nginx alone and over summon native (medians of the
per-round ratios), the p50 the plugin adds at c1 over nginx alone (the goals are checked
on `plugin_lua`, the faster config, when it ran, else on `plugin`), and the decision
endpoint's own cost per call (wrk straight at /decide at c32, one summon worker:
1e6 / calls per second is the CPU time of one call, HTTP parsing included).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import benchlib as bl
from targets import (
    HOST,
    ROOT,
    Bench,
    HarnessError,
    TargetUnavailable,
    figure,
    fmt,
    probe,
    round_ratios,
    start_and_measure,
    start_nginx,
    start_nginx_proxy,
    start_summon,
    start_upstream,
)

GOAL_OVER_NGINX = 0.8  # plugin req/s / nginx-alone req/s at c32 (issue: "the aim is 0.8x")
GOAL_OVER_SUMMON = 1.0  # plugin req/s / summon-native req/s at c32, at least
GOAL_ADDED_P50_MS = 0.3  # plugin p50 - nginx-alone p50 at c1, below
SHIPPED = ROOT / "plugins" / "nginx" / "summon.conf"
SHIPPED_LUA = ROOT / "plugins" / "nginx" / "summon-lua.conf"
LUA_MODULES = ("/usr/lib/nginx/modules/ndk_http_module.so", "/usr/lib/nginx/modules/ngx_http_lua_module.so")
_CACHE_LINES = re.compile(r"^\s*(proxy_cache\b|proxy_cache_key\b|proxy_set_header X-Summon-Cache\b).*$\n", re.M)


def start_nginx_var(bench: Bench, upstream_port: int) -> tuple[bl.Proc, int]:
    server = f"""  server {{
    listen {HOST}:@PORT@;
    location / {{
      set $target "{HOST}:{upstream_port}";
      proxy_pass http://$target;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
"""
    return start_nginx(bench, "nginx-var", server)


def plugin_server_block(bench: Bench, plugin: str, cache: bool, shipped: Path = SHIPPED) -> str:
    """A shipped config, pointed at this run's summon and listening on @PORT@."""
    text = shipped.read_text()
    changes = [("127.0.0.1:8082", plugin), ("listen 80;", f"listen {HOST}:@PORT@;")]
    if shipped == SHIPPED:
        changes.append(("/var/cache/nginx/summon", str(bench.tmp / ("decisions" if cache else "unused"))))
    for old, new in changes:
        if old not in text:
            raise HarnessError(f"{shipped} no longer has {old!r}")
        text = text.replace(old, new)
    if not cache:  # summon.conf: its proxy_cache lines; summon-lua.conf: X-Summon-Cache only
        text, n = _CACHE_LINES.subn("", text)
        if n != (3 if shipped == SHIPPED else 1):
            raise HarnessError(f"{shipped}: unexpected number of decision-cache lines to take out: {n}")
    return text


def decide_cost(bench: Bench, plugin_port: int) -> dict:
    """wrk straight at /decide (static route, no /done: each lease ends after the estimate)."""
    argv = bl.wrk_argv(f"http://{HOST}:{plugin_port}/decide", bench.duration_s, 32, timeout_s=bench.args.wrk_timeout)
    for field in ("X-Original-Method: GET", "X-Original-URI: /", "X-Original-Host: bench.test",
                  "X-Forwarded-For: 127.0.0.1"):
        argv[1:1] = ["-H", field]
    runs = []
    for _ in range(bench.args.repeat):
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=bench.duration_s + 60, check=False)
        try:
            runs.append(bl.parse_wrk(cp.stdout))
        except bl.WrkParseError as e:
            return {"error": f"wrk at /decide failed: {e}"}
    rps = bl.median(r["requests_per_s"] for r in runs)
    non2xx = sum(r["non2xx"] for r in runs)
    return {"calls_per_s": rps, "us_per_call": 1e6 / rps if rps else None, "non2xx": non2xx,
            "all_calls_per_s": [r["requests_per_s"] for r in runs], "command": " ".join(argv)}


def section_plugin(bench: Bench) -> dict:
    bench.log("plugin: starting the upstream (nginx, return 200)")
    try:
        up_proc, up_port = start_upstream(bench)
        probe(up_port)
    except TargetUnavailable as e:
        raise HarnessError(f"the upstream is needed by every target: {e}") from None
    plugin_port = bl.free_port(HOST)
    try:
        summon_proc, summon_port = start_summon(
            bench, up_port, name="summon-plugin",
            extra_proxy=f'[plugin]\nlisten = "{HOST}:{plugin_port}"\n')
        probe(summon_port)
    except TargetUnavailable as e:
        raise HarnessError(f"summon is needed by every plugin target: {e}") from None
    plugin = f"{HOST}:{plugin_port}"
    bench.log("plugin: the decision endpoint alone (wrk at /decide, c32)")
    cost = decide_cost(bench, plugin_port)

    def with_cache(b: Bench, _up: int) -> tuple[bl.Proc, int]:
        return start_nginx(b, "nginx-plugin", plugin_server_block(b, plugin, cache=True))

    def without_cache(b: Bench, _up: int) -> tuple[bl.Proc, int]:
        return start_nginx(b, "nginx-plugin-nocache", plugin_server_block(b, plugin, cache=False))

    def lua(cache: bool):
        def start(b: Bench, _up: int) -> tuple[bl.Proc, int]:
            missing = [m for m in LUA_MODULES if not Path(m).exists()]
            if missing:
                raise TargetUnavailable(f"{', '.join(missing)} missing (Debian: apt-get install libnginx-mod-http-lua"
                                        " lua-resty-core lua-resty-lrucache; or run scripts/setup.sh)")
            name = "nginx-plugin-lua" + ("" if cache else "-nocache")
            main = "".join(f"load_module {m};\n" for m in LUA_MODULES)
            return start_nginx(b, name, plugin_server_block(b, plugin, cache, SHIPPED_LUA), main=main)
        return start

    def native(_b: Bench, _up: int) -> tuple[bl.Proc, int]:
        return summon_proc, summon_port  # already running; start_and_measure stops it at the end

    targets = start_and_measure(bench, "plugin", [
        ("nginx", start_nginx_proxy, bench.duration_s),
        ("nginx_var", start_nginx_var, bench.duration_s),
        ("summon", native, bench.duration_s),
        ("plugin", with_cache, bench.duration_s),
        ("plugin_nocache", without_cache, bench.duration_s),
        ("plugin_lua", lua(cache=True), bench.duration_s),
        ("plugin_lua_nocache", lua(cache=False), bench.duration_s),
    ], up_port, [1, 32])
    if not up_proc.alive():
        raise HarnessError(f"the upstream nginx died during the run:\n{up_proc.output_tail()}")
    bench.procs.stop(up_proc)

    best = "plugin_lua" if targets.get("plugin_lua", {}).get("available") else "plugin"

    def over_nginx_of(name: str) -> float | None:
        return bl.median(round_ratios(targets, name, "nginx", 32))

    def added_of(name: str) -> float | None:
        return bl.difference(figure(targets, name, 1, "p50_ms"), figure(targets, "nginx", 1, "p50_ms"))

    over_nginx = over_nginx_of(best)
    over_summon = bl.median(round_ratios(targets, best, "summon", 32))
    added = added_of(best)
    goals = {
        "plugin_over_nginx_rps_c32": {"value": over_nginx, "goal": f">= {GOAL_OVER_NGINX}",
                                      "status": bl.check_goal(over_nginx, ">=", GOAL_OVER_NGINX)},
        "plugin_over_summon_rps_c32": {"value": over_summon, "goal": f">= {GOAL_OVER_SUMMON}",
                                       "status": bl.check_goal(over_summon, ">=", GOAL_OVER_SUMMON)},
        "plugin_added_p50_ms_c1": {"value": added, "goal": f"< {GOAL_ADDED_P50_MS}",
                                   "status": bl.check_goal(added, "<", GOAL_ADDED_P50_MS)},
    }
    reference = {
        "nginx_var_over_nginx_rps_c32": bl.median(round_ratios(targets, "nginx_var", "nginx", 32)),
        "summon_over_nginx_rps_c32": bl.median(round_ratios(targets, "summon", "nginx", 32)),
    }
    for name in ("plugin", "plugin_nocache", "plugin_lua", "plugin_lua_nocache"):
        reference[f"{name}_over_nginx_rps_c32"] = over_nginx_of(name)
        reference[f"{name}_over_summon_rps_c32"] = bl.median(round_ratios(targets, name, "summon", 32))
        reference[f"{name}_added_p50_ms_c1"] = added_of(name)
    reference["plugin_over_nginx_var_rps_c32"] = bl.median(round_ratios(targets, "plugin", "nginx_var", 32))
    print_table(targets, goals, reference, cost)
    print(f"goals checked on: {best}")
    return {"settings": {"duration_s": bench.duration_s, "repeat": bench.args.repeat, "wrk_threads": 1,
                         "concurrencies": [1, 32], "config": str(SHIPPED.relative_to(ROOT)),
                         "config_lua": str(SHIPPED_LUA.relative_to(ROOT)), "goals_on": best},
            "plugin_over_nginx_rps_c32_per_round": round_ratios(targets, best, "nginx", 32),
            "targets": targets, "goals": goals, "reference": reference, "decide": cost}


def print_table(targets: dict, goals: dict, reference: dict, cost: dict) -> None:
    print()
    print(f"{'target':<19} {'conc':>4} {'req/s':>11} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}")
    for name, t in targets.items():
        if not t.get("available"):
            print(f"{name:<19} {'':>4} {'unavailable':>11}")
            continue
        for c in (1, 32):
            r = t["runs"].get(f"c{c}", {})
            print(f"{name:<19} {c:>4} {fmt(r.get('requests_per_s'), 1):>11} {fmt(r.get('p50_ms'), 3):>9}"
                  f" {fmt(r.get('p99_ms'), 3):>9} {r.get('errors', '-'):>7}")
    print()
    for key, g in goals.items():
        print(f"{key:<40} {fmt(g['value'], 3):>8}   goal {g['goal']:<7} {g['status']}")
    for key, value in reference.items():
        print(f"{key:<40} {fmt(value, 3):>8}")
    print(f"{'decide us per call (c32)':<40} {fmt(cost.get('us_per_call'), 1):>8}"
          f"   ({fmt(cost.get('calls_per_s'), 0)} calls/s)")
    print()
