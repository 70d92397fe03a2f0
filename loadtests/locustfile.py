"""Locust: a spike of users from several regions browsing the demo site (`decks`).

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:18080 \\
        --spike-profile quick --region-weights eu=6,us=3,ap=1

Normally started by `loadtests/spike.py` (which also starts summon, watches its admin
API and draws the chart). Every user belongs to one region (handed out by a smooth
weighted round-robin over `--region-weights`, so the first user is from the busiest
region) and sends it as `X-Client-Region`, which summon believes because the load test
config lists 127.0.0.1 in `trusted_proxies`. Each user also sends `X-User: N`, the
route's hash key, so consistent hashing spreads users (all on 127.0.0.1) over replicas.
With `--region-hosts eu=URL,us=URL,...` each user sends its requests to its own region's
proxy instead of `--host` (several proxies sharing one fleet: the bench's `fleet` section).

The `Spike` shape: quiet (a few users), a surge to the peak within seconds, a plateau,
a linear decay to nothing, then a tail with no users so that the pools idle back to
zero. Its phases come from `--spike-profile` (see regions.PROFILES) and the overrides
`--peak-users`, `--quiet-users`, `--quiet-s`, `--surge-s`, `--plateau-s`,
`--decay-s`, `--tail-s`; every option also reads an environment variable
(LOCUST_SPIKE_PROFILE, LOCUST_REGION_WEIGHTS, ...).
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import locust.stats
from locust import FastHttpUser, LoadTestShape, events, task
from regions import DEFAULT_WEIGHTS, PROFILES, Profile, WeightedCycle, parse_hosts, parse_weights

# Locust's "current" percentiles (the *_stats_history.csv columns) cover the last 10 s by
# default, which smears a surge over the chart; 2 s shows it as it happens.
locust.stats.CURRENT_RESPONSE_TIME_PERCENTILE_WINDOW = 2

PAGES = [
    # (path, weight): what a reader of a small blog fetches
    ("/", 5),
    ("/about.html", 2),
    ("/posts/first.html", 3),
    ("/posts/cold-starts.html", 2),
    ("/feed.xml", 1),
]
ASSETS = ["/style.css", "/logo.svg"]


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("summon spike")
    group.add_argument("--spike-profile", choices=sorted(PROFILES), default="quick", env_var="LOCUST_SPIKE_PROFILE",
                       help="spike profile (phases and peak); default quick")
    group.add_argument("--region-weights", default=DEFAULT_WEIGHTS, env_var="LOCUST_REGION_WEIGHTS",
                       help=f"client regions and their weights, default {DEFAULT_WEIGHTS}")
    group.add_argument("--region-hosts", default="", env_var="LOCUST_REGION_HOSTS",
                       help="REGION=URL,...: each region's users go to that proxy (default: all to --host)")
    for name, kind in (("peak-users", int), ("quiet-users", int), ("quiet-s", float), ("surge-s", float),
                       ("plateau-s", float), ("decay-s", float), ("tail-s", float), ("think-min-s", float),
                       ("think-max-s", float)):
        group.add_argument(f"--{name}", type=kind, default=None, env_var="LOCUST_" + name.upper().replace("-", "_"),
                           help="override the profile's value")


def profile_of(options: Any) -> Profile:
    base = PROFILES[getattr(options, "spike_profile", None) or "quick"]
    return base.with_overrides(**{k: getattr(options, k, None) for k in (
        "peak_users", "quiet_users", "quiet_s", "surge_s", "plateau_s", "decay_s", "tail_s",
        "think_min_s", "think_max_s")})


_cycle: WeightedCycle | None = None
_user_ids = itertools.count(1)


@events.test_start.add_listener
def _check_options(environment: Any, **_: Any) -> None:
    global _cycle
    options = environment.parsed_options
    weights = parse_weights(options.region_weights if options else DEFAULT_WEIGHTS)
    _cycle = WeightedCycle(weights)


class Reader(FastHttpUser):
    """Reads a page, then its assets, then thinks a little."""

    def wait_time(self) -> float:
        p = profile_of(self.environment.parsed_options)
        return random.uniform(p.think_min_s, p.think_max_s)

    def on_start(self) -> None:
        global _cycle
        if _cycle is None:
            _cycle = WeightedCycle(parse_weights(DEFAULT_WEIGHTS))
        self.region = _cycle.next()
        self.user_id = next(_user_ids)
        self.headers = {"X-Client-Region": self.region, "X-User": str(self.user_id)}
        options = self.environment.parsed_options
        # an absolute URL goes to that proxy; `name` keeps one stats row per path
        self.base = parse_hosts(getattr(options, "region_hosts", "") or "").get(self.region, "")

    @task
    def read(self) -> None:
        path = random.choices([p for p, _ in PAGES], weights=[w for _, w in PAGES])[0]
        self.client.get(self.base + path, headers=self.headers, name=path)
        if random.random() < 0.5:  # half the visits come with a cold browser cache
            for asset in ASSETS:
                self.client.get(self.base + asset, headers=self.headers, name=asset)


class Spike(LoadTestShape):
    """quiet -> surge (seconds) -> plateau -> decay -> tail of zero users."""

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else None
        return profile_of(options).users_at(self.get_run_time())
