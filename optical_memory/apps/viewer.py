"""The memory viewer of `optical-memory serve`: server-rendered HTML, no JavaScript.

`/ui/sessions/{id}` shows one session's memory: the page thumbnails grouped by
the tier each page is in now (faded pages smaller, pages out of the context
dimmed), the tokens-by-age chart (inline SVG), the plan table and a table of the
pages; hovering a page shows its turns and its expected reading precision.
`/ui` lists the tenant's sessions. On a server with keys, open
`/ui/sessions/ID?key=KEY` once: the key moves into a same-site, HTTP-only cookie
(the URL is redirected without it), which also authenticates the thumbnails.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from optical_memory.modes import FADING_ORDER
from optical_memory.prompt import age_text

if TYPE_CHECKING:
    from optical_memory.memory import OpticalMemory


class Server(Protocol):
    """What the viewer needs of the server (`optical_memory.apps.server.Server`)."""

    memory: OpticalMemory

    def authenticate(self, request: Request, cookie: bool = False) -> Any: ...

    async def call(self, fn: Callable[..., Any], *args: Any, session: str | None = None) -> Any: ...

    async def existing(self, tenant: Any, session: str) -> str: ...

COOKIE = "om_key"
THUMB_WIDTH = 160
EXCERPT_CHARS = 160
EXCERPT_TURNS = 12
# a colour per tier: sharp pages dark, faded ones light
COLOURS = {
    "gundam": "#1f4e79", "large": "#2e75b6", "base": "#5b9bd5", "small": "#9dc3e6",
    "tiny": "#c9ddf0", "text": "#548235", "out": "#bfbfbf", "recent": "#70ad47",
}

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em} h2{font-size:1.1em;margin:1.2em 0 .4em}
.summary{color:#555} table{border-collapse:collapse;margin:.4em 0}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right} th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}
.page{position:relative;margin:0;border:1px solid #ccc;padding:4px;background:#fff}
.page img{display:block;width:{w}px;height:auto;background:#eee}
.page figcaption{font-size:12px;color:#444;max-width:{w}px}
.tier-out .page img{opacity:.35}
.page .tip{display:none;position:absolute;z-index:10;left:0;top:100%;width:380px;
  background:#fffbe6;border:1px solid #d6b656;padding:.5em;font-size:12px;
  box-shadow:0 2px 6px rgba(0,0,0,.2)}
.page:hover .tip,.page:focus .tip,.page:focus-within .tip{display:block}
.tip ol{margin:.3em 0;padding-left:1.4em} .tip li{margin:.15em 0;word-break:break-word}
.swatch{display:inline-block;width:.9em;height:.9em;vertical-align:-.1em;margin-right:.3em}
svg text{font:11px system-ui,sans-serif}
""".replace("{w}", str(THUMB_WIDTH))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _document(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>"
    )


def _login_redirect(request: Request) -> Response | None:
    """`?key=KEY`: the key into a cookie and the same URL without it."""
    key = request.query_params.get("key")
    if not key:
        return None
    rest = [(k, v) for k, v in request.query_params.multi_items() if k != "key"]
    url = request.url.path + (f"?{urlencode(rest)}" if rest else "")
    response = RedirectResponse(url, 303)
    response.set_cookie(COOKIE, key, httponly=True, samesite="strict", path="/")
    return response


async def index(server: Server, request: Request) -> Response:
    redirect = _login_redirect(request)
    if redirect is not None:
        return redirect
    tenant = server.authenticate(request, cookie=True)
    ids = await server.call(server.memory.sessions)
    mine = sorted(s for s in map(tenant.external, ids) if s is not None)
    items = "".join(
        f'<li><a href="/ui/sessions/{quote(s, safe="")}">{_e(s)}</a></li>' for s in mine
    )
    body = f"<h1>Sessions</h1><ul id=\"sessions\">{items or '<li>none yet</li>'}</ul>"
    return HTMLResponse(_document("optical-memory sessions", body))


async def page(server: Server, request: Request) -> Response:
    redirect = _login_redirect(request)
    if redirect is not None:
        return redirect
    tenant = server.authenticate(request, cookie=True)
    session = request.path_params["session"]
    sid = await server.existing(tenant, session)
    query = request.query_params.get("query") or None
    plan, turns = await server.call(_load, server, sid, query, session=session)
    return HTMLResponse(render(session, plan, turns, query))


def _load(server: Server, sid: str, query: str | None) -> tuple[dict[str, Any], list[Any]]:
    plan = server.memory.plan(sid, query)
    return plan.to_dict(), server.memory.store.turns(sid)


def _mode(p: Mapping[str, Any]) -> str:
    return p.get("mode") or "out"


def _precision(p: Mapping[str, Any]) -> str:
    value = p.get("precision")
    if value is None:
        return "not estimated"
    return f"{float(value):.0%}"


def render(session: str, plan: Mapping[str, Any], turns: Sequence[Any],
           query: str | None = None) -> str:
    """The viewer page of a session from its plan (`Plan.to_dict()`) and its turns."""
    pages = list(plan.get("pages", []))
    groups: dict[str, list[Mapping[str, Any]]] = {}
    order = [*FADING_ORDER, "text", "out"]
    for p in pages:
        groups.setdefault(_mode(p), []).append(p)
    order += [m for m in groups if m not in order]
    base = f"/v1/sessions/{quote(session, safe='')}/pages"
    now = time.time()
    sections = []
    for mode in order:
        members = groups.get(mode)
        if not members:
            continue
        figures = "".join(_figure(base, p, turns, now) for p in members)
        sections.append(
            f'<section class="tier tier-{_e(mode)}" data-tier="{_e(mode)}">'
            f'<h3><span class="swatch" style="background:{COLOURS.get(mode, "#999")}"></span>'
            f"{_e(mode)} ({len(members)} page{'s' if len(members) != 1 else ''})</h3>"
            f'<div class="thumbs">{figures}</div></section>'
        )
    history = plan.get("history_tokens", 0)
    used = plan.get("total", 0)
    summary = (
        f"{plan.get('turns', 0):,} turns, {len(pages):,} pages, "
        f"{plan.get('vision_tokens', 0):,} vision tokens; the context takes {used:,} of "
        f"{plan.get('window', 0):,} positions; the history as plain text is {history:,} tokens"
    )
    body = [
        f"<h1>Memory of session <code>{_e(session)}</code></h1>",
        f'<p class="summary" id="summary">{_e(summary)}'
        + (f"; planned for the question <q>{_e(query)}</q>" if query else "") + "</p>",
        '<h2>Pages by tier</h2><div id="tiers">',
        "".join(sections) or "<p>No pages yet: every turn is recent text.</p>",
        "</div>",
        "<h2>Tokens by age</h2>",
        tokens_chart(plan),
        "<h2>Plan</h2>",
        plan_table(plan),
        "<h2>Pages</h2>",
        pages_table(pages),
    ]
    return _document(f"memory of {session}", "".join(body))


def _figure(base: str, p: Mapping[str, Any], turns: Sequence[Any], now: float) -> str:
    mode = _mode(p)
    tier = mode if mode in FADING_ORDER else "full"
    n = p.get("index", 0)
    src = f"{base}/{int(n)}.png?tier={tier}&width={THUMB_WIDTH}"
    first, last = int(p.get("first_turn", 0)), int(p.get("last_turn", 0))
    shown = turns[first : min(last + 1, first + EXCERPT_TURNS)]
    items = "".join(
        f"<li value=\"{t.index + 1}\"><b>{_e(t.role)}</b>: {_e(_cut(t.content))}</li>"
        for t in shown
    )
    more = last + 1 - first - len(shown)
    if more > 0:
        items += f"<li>… {more} more</li>"
    age = age_text(max(0.0, now - float(p.get("newest_time", now))))
    head = (
        f"page {n}: turns {first + 1}-{last + 1}, {age}; {mode}; "
        f"{p.get('text_tokens', 0):,} text tokens in {p.get('vision_tokens', 0):,} positions; "
        f"expected precision {_precision(p)}"
    )
    return (
        f'<figure class="page" tabindex="0" data-page="{int(n)}" data-mode="{_e(mode)}" '
        f'data-precision="{_e(p.get("precision", ""))}" title="{_e(head)}">'
        f'<img class="thumb" src="{_e(src)}" alt="page {int(n)} at {_e(mode)}" '
        f'width="{THUMB_WIDTH}" loading="eager">'
        f"<figcaption>p{int(n)} · turns {first + 1}-{last + 1} · {_e(_precision(p))}"
        f'</figcaption><div class="tip"><b>{_e(head)}</b><ol>{items}</ol></div></figure>'
    )


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


def tokens_chart(plan: Mapping[str, Any]) -> str:
    """Inline SVG: for each page (oldest left) its text tokens (outline) and the positions it
    takes in context (filled, the tier's colour); the recent text last."""
    pages = list(plan.get("pages", []))
    bars = [
        (f"p{p.get('index')}", _mode(p), int(p.get("text_tokens", 0)),
         int(p.get("vision_tokens", 0)) if _mode(p) != "text" else int(p.get("text_tokens", 0)))
        for p in pages
    ]
    # pages shown as text are part of the plan's recent text: counted once, at their page
    shown = sum(int(p.get("text_tokens", 0)) for p in pages if _mode(p) == "text")
    recent = max(0, int(plan.get("text_tokens", 0)) - shown)
    bars.append(("recent", "recent", recent, recent))
    top = max([1, *(max(b[2], b[3]) for b in bars)])
    width, height, left, bottom = 760, 220, 48, 28
    step = (width - left - 10) / max(1, len(bars))
    bar = max(1.0, step * 0.38)
    parts = [
        (
            f'<svg id="tokens-by-age" xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
            'aria-label="tokens by age: text tokens and context positions per page, oldest first">'
        ),
        (
            f'<line x1="{left}" y1="{height - bottom}" x2="{width - 5}" y2="{height - bottom}" '
            'stroke="#888"/>'
        ),
        f'<text x="4" y="14">{top:,}</text><text x="4" y="{height - bottom}">0</text>',
        (
            f'<text x="{left}" y="{height - 6}">oldest</text>'
            f'<text x="{width - 60}" y="{height - 6}">newest</text>'
        ),
    ]
    scale = (height - bottom - 20) / top
    for i, (label, mode, text, used) in enumerate(bars):
        x = left + i * step
        h_text, h_used = text * scale, used * scale
        y0 = height - bottom
        parts.append(
            f'<g class="bar" data-mode="{_e(mode)}"><title>{_e(label)}: {text:,} text tokens, '
            f"{used:,} positions ({_e(mode)})</title>"
            f'<rect x="{x:.1f}" y="{y0 - h_text:.1f}" width="{bar:.1f}" height="{h_text:.1f}" '
            'fill="none" stroke="#666"/>'
            f'<rect x="{x + bar:.1f}" y="{y0 - h_used:.1f}" width="{bar:.1f}" '
            f'height="{h_used:.1f}" fill="{COLOURS.get(mode, "#999")}"/></g>'
        )
    parts.append("</svg>")
    legend = " ".join(
        f'<span><span class="swatch" style="background:{c}"></span>{_e(m)}</span>'
        for m, c in COLOURS.items()
    )
    return "".join(parts) + f'<p class="legend">outline: text tokens; filled: positions in ' \
        f"context, by tier: {legend}</p>"


def plan_table(plan: Mapping[str, Any]) -> str:
    rows = []
    for r in plan.get("tiers", []):
        ratio = r.get("ratio")
        rows.append(
            f"<tr data-tier=\"{_e(r.get('tier'))}\"><td>{_e(r.get('tier'))}</td>"
            f"<td>{r.get('pages', 0):,}</td><td>{r.get('turns', 0):,}</td>"
            f"<td>{r.get('text_tokens', 0):,}</td><td>{r.get('context_tokens', 0):,}</td>"
            f"<td>{f'{ratio:.1f}x' if ratio else '-'}</td></tr>"
        )
    return (
        '<table id="plan-table"><thead><tr><th>tier</th><th>pages</th><th>turns</th>'
        "<th>text tokens</th><th>context tokens</th><th>ratio</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def pages_table(pages: Sequence[Mapping[str, Any]]) -> str:
    rows = "".join(
        f"<tr data-page=\"{int(p.get('index', 0))}\"><td>{int(p.get('index', 0))}</td>"
        f"<td>{int(p.get('first_turn', 0)) + 1}-{int(p.get('last_turn', 0)) + 1}</td>"
        f"<td>{_e(_mode(p))}</td><td>{p.get('text_tokens', 0):,}</td>"
        f"<td>{p.get('vision_tokens', 0):,}</td><td>{_e(_precision(p))}</td></tr>"
        for p in pages
    )
    return (
        '<table id="pages-table"><thead><tr><th>page</th><th>turns</th><th>tier</th>'
        "<th>text tokens</th><th>positions</th><th>expected precision</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )
