"""Which region a client is in (`proxy.engine.regions`)."""

from __future__ import annotations

import ipaddress

from proxy.config import Region
from proxy.engine import regions as regions_mod
from proxy.engine.regions import RegionMap

EU = Region("eu", ("us",), (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("2001:db8:1::/48")))
US = Region("us", ("eu",), (ipaddress.ip_network("10.2.0.0/16"),))


def test_the_first_region_whose_networks_hold_the_address() -> None:
    m = RegionMap((EU, US), "eu")
    assert m.region_of("10.2.3.4") == "us"
    assert m.region_of("10.1.0.1") == "eu"
    assert m.region_of("2001:db8:1::5") == "eu"


def test_anything_else_is_the_default_region() -> None:
    m = RegionMap((EU, US), "us")
    assert m.region_of("192.0.2.1") == "us"
    assert m.region_of("not-an-ip") == "us"  # a Unix socket peer, say


def test_a_header_counts_only_when_it_names_a_configured_region() -> None:
    m = RegionMap((EU, US), "eu")
    assert m.region_of("10.1.0.1", "us") == "us"
    assert m.region_of("10.1.0.1", "mars") == "eu"
    assert m.region_of("10.1.0.1", "") == "eu"


def test_the_cache_is_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(regions_mod, "CACHE_MAX", 3)
    m = RegionMap((EU, US), "eu")
    for i in range(10):
        assert m.region_of(f"10.2.0.{i}") == "us"
        assert len(m._cache) <= 4
