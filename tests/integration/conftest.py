"""Every in-process proxy here runs with `CheckedExchange`: each phase change an exchange
makes is checked against `proxy.http.exchange.NEXT`, so the whole integration suite
(retries, trials, tunnels, pipelining, smuggling shapes) exercises the table. The hot
path sets `phase` directly, unchecked; this is where the table is enforced."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from proxy.http import exchange as exchange_mod
from proxy.http import front
from proxy.http.exchange import NEXT, Exchange, Phase

_slot = Exchange.phase  # the slot's descriptor: the subclass's property stores through it


class CheckedExchange(Exchange):
    illegal: list[tuple[Phase, Phase]] = []

    @property  # type: ignore[override]
    def phase(self) -> Phase:
        return _slot.__get__(self)  # type: ignore[no-any-return]

    @phase.setter
    def phase(self, new: Phase) -> None:
        try:
            old = _slot.__get__(self)
        except AttributeError:
            old = None  # the first assignment, in __init__
        if old is not None and new is not old and new not in NEXT[old]:
            CheckedExchange.illegal.append((old, new))  # raised here it would become a 502
        _slot.__set__(self, new)


@pytest.fixture(autouse=True)
def checked_phases(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    CheckedExchange.illegal = []
    monkeypatch.setattr(front, "Exchange", CheckedExchange)
    yield
    assert CheckedExchange.illegal == [], f"exchange phase changes not in {exchange_mod.__name__}.NEXT"
