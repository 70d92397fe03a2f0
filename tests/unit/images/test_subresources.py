"""What a page makes a browser fetch (proxy/images/subresources.py), and split-site's
`prefetch` lists built from it."""

from __future__ import annotations

from pathlib import Path

from proxy.images.sitesplit import followers, scan_site
from proxy.images.subresources import css_urls, page_subresources

PAGE = """<!doctype html><html><head>
<link rel="stylesheet" href="style.css"><link rel="alternate" href="/feed.xml">
<link rel="icon" href="/favicon.ico"><link rel="preload" href="/fonts/a.woff2" as="font">
<style>body { background: url('/bg.png') }</style>
<script src="/app.js?v=3"></script>
</head><body style="background-image: url(&quot;/hero.jpg&quot;)">
<a href="/about.html">about</a> <img src="/img/x.png" srcset="/img/x.png 1x, /img/x2.png 2x">
<img src="https://elsewhere.example/t.png"><img src="//cdn.example/u.png"><img src="data:image/png;base64,AA">
<img src="/missing.png"><img src="/posts/#frag">
</body></html>"""
KNOWN = {"/", "/posts/", "/posts/index.html", "/posts/style.css", "/style.css", "/feed.xml", "/favicon.ico",
         "/fonts/a.woff2", "/fonts/b.woff2", "/bg.png", "/app.js", "/hero.jpg", "/about.html", "/img/x.png",
         "/img/x2.png", "/posts/dot.svg"}
CSS = {"/posts/style.css": '@import "../base.css"; h1 { background: url(dot.svg) } @font-face { src: url("/fonts/b.woff2") }'}


def test_page_subresources_are_what_rendering_fetches_in_order() -> None:
    got = page_subresources(PAGE, "/posts/", KNOWN, CSS.get)
    assert got == ["/posts/style.css", "/favicon.ico", "/fonts/a.woff2", "/bg.png", "/app.js", "/hero.jpg",
                   "/img/x.png", "/img/x2.png", "/posts/dot.svg", "/fonts/b.woff2"]
    # not the links a user may follow, nothing of another host, nothing the site lacks, not the page itself


def test_css_urls_finds_url_and_import_forms() -> None:
    assert css_urls("""a{b:url(x.png)} c{d:url( "y.png" )} @import 'z.css'; e{f:url('w.svg')}""") == [
        "x.png", "y.png", "z.css", "w.svg"]


def test_stylesheet_import_cycles_end() -> None:
    sheets = {"/a.css": "@import 'b.css'; x{y:url(i.png)}", "/b.css": "@import '/a.css';"}
    got = page_subresources('<link rel="stylesheet" href="/a.css">', "/", {"/", "/a.css", "/b.css", "/i.png"},
                            sheets.get)
    assert got == ["/a.css", "/b.css", "/i.png"]


def test_split_site_followers_per_page_and_alias(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "posts").mkdir(parents=True)
    (site / "index.html").write_text('<link rel="stylesheet" href="style.css"><img src="logo.svg">')
    (site / "posts" / "index.html").write_text('<img src="../logo.svg"><img src="pic.png">')
    (site / "style.css").write_text("h1 { background: url(/posts/pic.png) }")
    (site / "logo.svg").write_text("<svg/>")
    (site / "posts" / "pic.png").write_bytes(b"png")
    resources, _ = scan_site(site, "s")
    got = followers(resources)
    assert got["/"] == got["/index.html"] == ["/style.css", "/logo.svg", "/posts/pic.png"]
    assert got["/posts/"] == got["/posts/index.html"] == ["/logo.svg", "/posts/pic.png"]
    assert set(got) == {"/", "/index.html", "/posts/", "/posts/index.html"}
