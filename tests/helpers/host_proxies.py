"""Run nginx, Caddy or HAProxy with the config shipped in plugins/, pointed at a test's
summon: only the listen port, the plugin's address and the file paths are changed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.helpers.paths import REPO

PLUGINS = REPO / "plugins"
SHIPPED_PLUGIN = "127.0.0.1:8082"  # what the shipped configs call


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"the shipped config no longer has {old!r}"
    return text.replace(old, new)


# Debian's libnginx-mod-http-lua (and the NDK it needs), for plugins/nginx/summon-lua.conf;
# Debian loads them from /etc/nginx/modules-enabled/, which the test's nginx.conf does not read.
NGINX_MODULES = Path("/usr/lib/nginx/modules")
LUA_MODULES = [NGINX_MODULES / "ndk_http_module.so", NGINX_MODULES / "ngx_http_lua_module.so"]


def nginx_lua_installed() -> bool:
    """The Lua module and resty.core, which the module refuses to start without."""
    return all(m.exists() for m in LUA_MODULES) and Path("/usr/share/lua/5.1/resty/core.lua").exists()


def nginx_config(tmp: Path, port: int, plugin: str, conf: str = "summon.conf") -> list[str]:
    site = (PLUGINS / "nginx" / conf).read_text()
    site = _replace(site, SHIPPED_PLUGIN, plugin)
    site = _replace(site, "listen 80;", f"listen 127.0.0.1:{port};")
    if conf == "summon.conf":  # summon-lua.conf keeps its decisions in memory
        site = _replace(site, "/var/cache/nginx/summon", str(tmp / "decisions"))
    (tmp / "site.conf").write_text(site)
    # As root, nginx's workers run as nobody, who cannot enter pytest's 0700 tmp dirs to
    # reach the decision cache: keep them as the test's user.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "".join(f"    {kind}_temp_path {tmp}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    modules = "".join(f"load_module {m};\n" for m in LUA_MODULES) if conf == "summon-lua.conf" else ""
    (tmp / "nginx.conf").write_text(
        f"{modules}daemon off;\n{user}worker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log info;\n"
        f"events {{ worker_connections 1024; }}\n"
        f"http {{\n    access_log {tmp}/access.log;\n{temp}    include {tmp}/site.conf;\n}}\n")
    return ["nginx", "-e", str(tmp / "error.log"), "-p", str(tmp), "-c", str(tmp / "nginx.conf")]


def caddy_config(tmp: Path, port: int, plugin: str) -> list[str]:
    text = (PLUGINS / "caddy" / "Caddyfile").read_text()
    text = _replace(text, SHIPPED_PLUGIN, plugin)
    text = _replace(text, "http://:80 {", f"http://:{port} {{\n\tbind 127.0.0.1")
    (tmp / "Caddyfile").write_text(text)
    return ["caddy", "run", "--config", str(tmp / "Caddyfile"), "--adapter", "caddyfile"]


def haproxy_config(tmp: Path, port: int, plugin: str) -> list[str]:
    shutil.copy(PLUGINS / "haproxy" / "summon.lua", tmp / "summon.lua")
    text = (PLUGINS / "haproxy" / "haproxy.cfg").read_text()
    text = _replace(text, "/etc/haproxy/summon.lua", str(tmp / "summon.lua"))
    text = _replace(text, "bind :80", f"bind 127.0.0.1:{port}")
    (tmp / "haproxy.cfg").write_text(text)
    return ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")]


def nginx_lua_config(tmp: Path, port: int, plugin: str) -> list[str]:
    return nginx_config(tmp, port, plugin, conf="summon-lua.conf")


CONFIGS = {"nginx": nginx_config, "nginx-lua": nginx_lua_config, "caddy": caddy_config, "haproxy": haproxy_config}


class HostProxy:
    """One host proxy process; `stop` ends it by its PID."""

    def __init__(self, kind: str, tmp: Path, port: int, plugin: str) -> None:
        self.kind = kind
        self.dir = tmp / kind
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.argv = CONFIGS[kind](self.dir, port, plugin)
        # Caddy keeps state under HOME/XDG dirs; HAProxy's Lua reads SUMMON_PLUGIN.
        self.env = dict(os.environ, HOME=str(self.dir), XDG_DATA_HOME=str(self.dir), XDG_CONFIG_HOME=str(self.dir),
                        SUMMON_PLUGIN=plugin)
        self.log = self.dir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HostProxy:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, cwd=self.dir, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} exited: {self.log.read_text()}") from None
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} did not start: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
