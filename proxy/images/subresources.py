"""What a browser fetches to render a page: its same-site subresources, from HTML and CSS.

Why: `summon routes split-site` writes them as the page route's `prefetch` list, so that a
request for the page boots their instances in the same wave as its own (see
proxy/engine/prefetch.py) instead of after the browser has read the HTML.

What counts: stylesheets (`<link rel=stylesheet>`), icons (`rel=icon`, `apple-touch-icon`,
`mask-icon`), preloads (`rel=preload`, `modulepreload`), scripts, images (`<img src>`,
`srcset` on `<img>` and `<source>`, `<video poster>`, `<input type=image>`), and `url()` in
`<style>` blocks, in `style` attributes and in the page's same-site stylesheets (fonts,
background images, `@import`), one level of stylesheet imports deep per sheet. Not what a
user may follow later (`<a href>`, `rel=alternate`, `rel=next`): those are other pages.
Only URLs of the same site (relative, or absolute with no other host) that name a file of
the site are kept, in document order, without query or fragment.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

_ORIGIN = "http://site.invalid"
_CSS_URL = re.compile(r"""url\(\s*(?:"([^"]*)"|'([^']*)'|([^)'"\s]*))\s*\)|@import\s+(?:"([^"]*)"|'([^']*)')""", re.I)
_ICON_RELS = {"icon", "apple-touch-icon", "apple-touch-icon-precomposed", "mask-icon"}
_PRELOAD_RELS = {"preload", "modulepreload"}


def css_urls(text: str) -> list[str]:
    """Every `url(...)` and `@import "..."` target of a stylesheet, in order."""
    return [next(g for g in m.groups() if g is not None) for m in _CSS_URL.finditer(text)]


def _srcset(value: str) -> list[str]:
    return [part.strip().split()[0] for part in value.split(",") if part.strip()]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []  # raw references, in document order
        self.sheets: list[str] = []  # the stylesheet links among them
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "base":
            return  # a <base href> is rare in a static site; resolving against the page is the safe guess
        if tag == "link":
            rel = set(a.get("rel", "").lower().split())
            href = a.get("href", "")
            if href and "stylesheet" in rel and "alternate" not in rel:
                self.found.append(href)
                self.sheets.append(href)
            elif href and (rel & _ICON_RELS or rel & _PRELOAD_RELS):
                self.found.append(href)
        elif tag in ("script", "img", "embed") and a.get("src"):
            self.found.append(a["src"])
        elif tag == "input" and a.get("type", "").lower() == "image" and a.get("src"):
            self.found.append(a["src"])
        elif tag == "video" and a.get("poster"):
            self.found.append(a["poster"])
        if tag in ("img", "source") and a.get("srcset"):
            self.found.extend(_srcset(a["srcset"]))
        if tag == "source" and a.get("src") and a.get("type", "").startswith("image/"):
            self.found.append(a["src"])
        if a.get("style"):
            self.found.extend(css_urls(a["style"]))
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.found.extend(css_urls(data))


def same_site_path(ref: str, base_url: str) -> str | None:
    """`ref` resolved against the URL path `base_url`, if it stays on this site."""
    ref = ref.strip()
    if not ref or ref.startswith(("data:", "javascript:", "blob:", "#")):
        return None
    parts = urlsplit(urljoin(_ORIGIN + base_url, ref))
    if f"{parts.scheme}://{parts.netloc}" != _ORIGIN or not parts.path:
        return None
    return parts.path


def page_subresources(html: str, page_url: str, known: Iterable[str],
                      read_css: Callable[[str], str | None]) -> list[str]:
    """The same-site URL paths among `known` that rendering `html` (served at `page_url`)
    fetches. `read_css(path)`: a same-site stylesheet's text (None if it is not ours)."""
    urls = set(known)
    parser = _Page()
    parser.feed(html)
    parser.close()
    out: dict[str, None] = {}

    def add(ref: str, base: str) -> str | None:
        path = same_site_path(ref, base)
        if path is not None and path in urls and path != page_url:
            out[path] = None
            return path
        return None

    sheets = [p for ref in parser.sheets if (p := same_site_path(ref, page_url)) is not None]
    for ref in parser.found:
        add(ref, page_url)
    seen: set[str] = set()
    queue = list(sheets)
    while queue and len(seen) < 64:  # bounded: @import chains, cycles
        sheet = queue.pop(0)
        if sheet in seen:
            continue
        seen.add(sheet)
        text = read_css(sheet)
        if text is None:
            continue
        for ref in css_urls(text):
            path = add(ref, sheet)
            if path is not None and path.endswith(".css"):
                queue.append(path)
    return list(out)
