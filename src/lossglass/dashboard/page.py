"""The dashboard's one HTML page: plotly.js (the copy bundled with plotly's Python package, embedded once, or served
by the live server), the runs' data as JSON, and a small script that lays out the overview table, each run's
panels, the side-by-side overlays and, in live mode, polls the server for progress.

Every piece of text from a run folder reaches the page as JSON and is put in the document with ``textContent``
(never parsed as HTML); a Content-Security-Policy with a fresh nonce lets only this page's own scripts run.
"""

from __future__ import annotations

import secrets

from ..report.base import PALETTE, esc


def _asset(name: str) -> str:
    from importlib import resources

    return resources.files("lossglass.dashboard").joinpath(name).read_text(encoding="utf-8")


def template_json() -> dict:
    """plotly's white template with the report's colour-blind-safe palette (sent once per page)."""
    import plotly.io as pio

    t = pio.templates["plotly_white"].to_plotly_json()
    t.setdefault("layout", {})["colorway"] = PALETTE
    return t


def plotly_js() -> str:
    """The plotly.min.js bundled with plotly's Python package (no network)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def render(data_json: str, *, title: str = "lossglass dashboard", plotly_src: str | None = None) -> str:
    """The whole page. ``data_json``: the page data as JSON (``<``, ``>`` and ``&`` already escaped, as plotly's
    encoder does); ``plotly_src``: a URL for plotly.js (live server), or None to embed it (a self-contained file)."""
    nonce = secrets.token_urlsafe(18)
    csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
           "img-src data: blob:; font-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'")
    if plotly_src is None:
        lib = f'<script nonce="{nonce}">{plotly_js()}</script>'
    else:
        lib = f'<script nonce="{nonce}" src="{esc(plotly_src)}"></script>'
    safe = data_json.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{_asset('dashboard.css')}</style></head><body>
<header><h1>lossglass dashboard</h1><nav><a href="#" data-view="overview">overview</a> &nbsp;
<a href="#compare" data-view="compare">side by side</a></nav><span id="live"></span></header>
<main id="main"></main>
{lib}
<script type="application/json" id="lg-data">{safe}</script>
<script nonce="{nonce}">{_asset('dashboard.js')}</script>
</body></html>
"""


def page_json(data: dict) -> str:
    """The page data as JSON (numpy arrays and plotly objects serialised by plotly's encoder)."""
    from plotly.io.json import to_json_plotly

    data = dict(data)
    data.setdefault("template", template_json())
    return to_json_plotly(data)
