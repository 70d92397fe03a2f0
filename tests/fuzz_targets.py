"""Coverage-guided fuzzing with atheris (libFuzzer) of the same properties as test_fuzz.py.

    python tests/fuzz_targets.py head   -max_total_time=120   # parse_head: RequestHead or ClientError
    python tests/fuzz_targets.py parser -max_total_time=120   # llhttp + parse_head, as the front drives them
    python tests/fuzz_targets.py config -max_total_time=120   # config.load: Config or ConfigError

Any other exception is a crash: libFuzzer stops and writes the input to crash-<sha1>.
Not collected by pytest (no test_ prefix); `make fuzz` runs it when atheris is installed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import httptools

    from proxy.config import ConfigError, load
    from proxy.errors import ClientError
    from proxy.http.message import parse_head

_TMP = Path(tempfile.mkdtemp(prefix="summon-fuzz-"))


def fuzz_head(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    method = fdp.ConsumeUnicodeNoSurrogates(8)
    version = fdp.PickValueInList(["1.1", "1.0", "2.0"])
    target = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
    headers = []
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        headers.append((fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20)), fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 30))))
    try:
        head = parse_head(method, target, version, headers, fdp.ConsumeBool(), 100)
    except ClientError:
        return
    assert sum(1 for k, _ in head.headers if k.lower() == b"host") == 1
    assert not (head.chunked and head.content_length is not None)
    assert head.path.startswith("/")


class _Collect:
    """The callbacks the front gives llhttp, reduced to collecting the head."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.heads: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []

    def on_message_begin(self) -> None:
        self.url, self.headers = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.heads.append((self.url, self.headers))


def fuzz_parser(data: bytes) -> None:
    cb = _Collect()
    parser = httptools.HttpRequestParser(cb)
    try:
        parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        pass
    if cb.heads:
        url, headers = cb.heads[0]
        try:
            parse_head(parser.get_method().decode("ascii", "replace"), url, parser.get_http_version(),
                       headers, parser.should_keep_alive(), 100)
        except ClientError:
            pass


def fuzz_config(data: bytes) -> None:
    path = _TMP / "summon.toml"
    path.write_bytes(data)
    try:
        load(path)
    except ConfigError:
        pass


TARGETS = {"head": fuzz_head, "parser": fuzz_parser, "config": fuzz_config}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
