"""Client regions and spike profiles, shared by the locustfile and the runner (spike.py).

Plain Python, no Locust import: the runner imports this module without pulling in
gevent's monkey patching.

- `parse_weights("eu=6,us=3,ap=1")` -> ``{"eu": 6.0, "us": 3.0, "ap": 1.0}``.
- `parse_hosts("eu=http://127.0.0.1:8001,us=...")` -> region -> proxy URL: each region's
  users then go to their own region's proxy (several proxies, one fleet).
- `WeightedCycle` hands out regions in a smooth weighted round-robin (nginx's
  algorithm), so the users of a run follow the weights exactly rather than by chance,
  and the first user is always from the busiest region.
- `Profile` is the spike: a quiet phase with a few users, a surge to the peak within
  seconds, a plateau, a linear decay back to nothing, then a tail with no users, long
  enough for `idle_timeout` to bring every pool back to zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

DEFAULT_WEIGHTS = "eu=6,us=3,ap=1"


def parse_weights(text: str) -> dict[str, float]:
    """``"eu=6,us=3,ap=1"`` -> ordered dict of region -> weight (> 0)."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"region weight {part!r}: expected NAME=WEIGHT")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"region weight {part!r}: {value.strip()!r} is not a number") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"region weight {part!r}: weight must be >= 0")
        if name in weights:
            raise ValueError(f"region weight {part!r}: region {name!r} given twice")
        weights[name] = w
    if not weights or not any(w > 0 for w in weights.values()):
        raise ValueError(f"region weights {text!r}: need at least one region with a weight > 0")
    return weights


def parse_hosts(text: str) -> dict[str, str]:
    """``"eu=http://127.0.0.1:8001,us=http://127.0.0.1:8002"`` -> region -> base URL
    (no trailing slash). An empty text gives an empty dict: every user uses --host."""
    hosts: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, url = part.partition("=")
        name, url = name.strip(), url.strip().rstrip("/")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ValueError(f"region host {part!r}: expected NAME=http://HOST:PORT")
        if name in hosts:
            raise ValueError(f"region host {part!r}: region {name!r} given twice")
        hosts[name] = url
    return hosts


def busiest(weights: dict[str, float]) -> str:
    """The region with the largest weight (the first one on a tie)."""
    return max(weights.items(), key=lambda kv: kv[1])[0]


class WeightedCycle:
    """Smooth weighted round-robin: for 6:3:1 the sequence is eu us eu ap eu us eu eu us eu ...
    (each region's share over any window of sum(weights) picks is exact)."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = {k: v for k, v in weights.items() if v > 0}
        self.current = dict.fromkeys(self.weights, 0.0)
        self.total = sum(self.weights.values())

    def next(self) -> str:
        for name, w in self.weights.items():
            self.current[name] += w
        best = max(self.current, key=lambda n: self.current[n])
        self.current[best] -= self.total
        return best


@dataclass(frozen=True)
class Profile:
    name: str
    quiet_users: int  # users during the quiet phase
    quiet_s: float
    peak_users: int
    surge_s: float  # quiet -> peak within this many seconds
    plateau_s: float
    decay_s: float  # peak -> 0, linearly
    tail_s: float  # no users: the pools must idle back to zero
    idle_timeout_s: float  # the route's idle_timeout for this profile (the runner writes it)
    think_min_s: float = 0.2
    think_max_s: float = 1.0
    max_instances: int | None = None  # override of [limits] max_instances (None: keep the config's)
    boot_timeout_s: float | None = None

    @property
    def total_s(self) -> float:
        return self.quiet_s + self.surge_s + self.plateau_s + self.decay_s + self.tail_s

    def phases(self) -> list[tuple[str, float, float]]:
        """(name, start, end) in seconds since the start of the run."""
        out = []
        t = 0.0
        for name, span in (("quiet", self.quiet_s), ("surge", self.surge_s), ("plateau", self.plateau_s),
                           ("decay", self.decay_s), ("tail", self.tail_s)):
            out.append((name, t, t + span))
            t += span
        return out

    def users_at(self, t: float) -> tuple[int, float] | None:
        """(users, spawn rate) at `t` seconds into the run, or None when the run is over."""
        q_end = self.quiet_s
        s_end = q_end + self.surge_s
        p_end = s_end + self.plateau_s
        d_end = p_end + self.decay_s
        if t < q_end:
            # one user a second: the first request (the cold boot) comes from the first user,
            # who is from the busiest region (WeightedCycle), not from whoever races ahead
            return self.quiet_users, 1.0
        if t < s_end:
            # the surge: Locust spawns at this rate, so the peak is reached by the end of the surge
            surge = max(1.0, (self.peak_users - self.quiet_users) / max(self.surge_s, 1.0))
            return self.peak_users, surge
        # Locust warns about spawn rates over 100 (it also stops users at this rate)
        rate = float(min(100, max(1, self.peak_users)))
        if t < p_end:
            return self.peak_users, rate
        if t < d_end:
            left = 1.0 - (t - p_end) / max(self.decay_s, 1e-9)
            return max(0, int(round(self.peak_users * left))), rate
        if t < self.total_s:
            return 0, rate
        return None

    def with_overrides(self, **kw: float | int | None) -> Profile:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


PROFILES: dict[str, Profile] = {
    # the real run: several hundred users, about two and a half minutes
    "spike": Profile("spike", quiet_users=6, quiet_s=20, peak_users=300, surge_s=5, plateau_s=60, decay_s=20,
                     tail_s=40, idle_timeout_s=15),
    # CI smoke: 40 users, about 40 s
    "quick": Profile("quick", quiet_users=3, quiet_s=6, peak_users=40, surge_s=2, plateau_s=12, decay_s=5,
                     tail_s=15, idle_timeout_s=5),
    # the pytest smoke test: 10 users, about 15 s
    "tiny": Profile("tiny", quiet_users=2, quiet_s=3, peak_users=10, surge_s=1, plateau_s=4, decay_s=2,
                    tail_s=6, idle_timeout_s=2),
    # real VMs (libvirt): fewer users and instances, longer boots, a longer tail
    "libvirt": Profile("libvirt", quiet_users=2, quiet_s=20, peak_users=30, surge_s=5, plateau_s=60, decay_s=10,
                       tail_s=50, idle_timeout_s=20, max_instances=3, boot_timeout_s=60),
}
