"""The static report: ``figures/`` (PNG + SVG) and one self-contained ``report.html`` (images embedded) with a summary
of findings, a section per protocol (drawn by the protocol's layer: :mod:`.train`, :mod:`.timeline`, :mod:`.walk`,
:mod:`.connect`, :mod:`.replicas`, :mod:`.curvature`, then :mod:`.selection`), captions, the tables behind the figures, and the
config, seed, versions and run times at the end.

Rebuilding it (``lossglass report RUN``) reads only saved data; output is byte-for-byte stable apart from the one
timestamp line.
"""

from __future__ import annotations

import json
import time

import matplotlib

from ..store import RunStore
from .base import STYLE, Page, RunView, esc, fmt, layers


def sections() -> list[tuple[str, object]]:
    """The report's sections in run order: ``(layer name, section(page))`` of each stage that declares a report layer
    (:attr:`lossglass.stages.base.Stage.report`)."""
    return [(name, module.section) for name, _, module, _ in layers()]

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}table{border-collapse:collapse;font-size:.85em;margin:1em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right}th{background:#f4f6f8;cursor:pointer}
td:first-child,th:first-child{text-align:left}figure{margin:1.2em 0}img{max-width:100%}
figcaption{font-size:.9em;color:#444;max-width:900px}.summary td:nth-child(3){text-align:left;color:#444}
.missing{background:#fff4e5;border:1px solid #f0c36d;padding:.5em 1em}footer{margin-top:3em;font-size:.85em;color:#555}"""
JS = """document.querySelectorAll('table.sortable').forEach(function(t){t.querySelectorAll('th').forEach(function(th,i){
th.addEventListener('click',function(){var b=t.tBodies[0],rows=Array.from(b.rows),asc=th.dataset.asc!=='1';
th.dataset.asc=asc?'1':'0';rows.sort(function(x,y){var a=x.cells[i].textContent,c=y.cells[i].textContent,
p=parseFloat(a),q=parseFloat(c);var r=(!isNaN(p)&&!isNaN(q))?p-q:a.localeCompare(c);return asc?r:-r;});
rows.forEach(function(r){b.appendChild(r);});});});});"""


def _when(meta: dict, key: str, absent: str) -> str:
    v = meta.get(key)
    return esc(str(v)) if v else absent


def build_report(store: RunStore | str, *, timestamp: str | None = None) -> str:
    """Write ``figures/`` and ``report.html`` from what the run folder holds; returns the HTML path.
    Missing stages are listed at the top, never a crash."""
    store = (store if isinstance(store, RunStore) else RunStore(store, create=False)).require_run()
    view = RunView(store)
    with matplotlib.rc_context(STYLE):
        page = Page(view)
        page.missing += view.missing()
        for name, section in sections():
            try:
                section(page)
            except Exception as e:  # noqa: BLE001 - one broken section must not lose the rest of the report
                page.missing.append(f"section {name} could not be drawn: {type(e).__name__}: {e}")
        page.missing += [p for p in view.problems if p not in page.missing]
    meta = view.meta
    cfg = view.config_text()
    title = f"lossglass report — {view.name}"
    summary = "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td>{esc(c)}</td></tr>" for a, b, c in page.summary)
    missing = ""
    if page.missing:
        missing = ('<div class="missing"><b>This run is incomplete.</b> Missing:<ul>'
                   + "".join(f"<li>{esc(m)}</li>" for m in page.missing) + "</ul></div>")
    stage_rows = "".join(f"<tr><td>{esc(k)}</td><td>{fmt(v.get('seconds', float('nan')))}</td></tr>"
                         for k, v in view.stages().items() if k != "report" and isinstance(v, dict))
    stamp = timestamp or time.strftime("%Y-%m-%d %H:%M:%S")
    # the report stage stamps meta.json before drawing; a report rebuilt while a study runs (or after it stopped
    # early) has no end time yet
    finished = _when(meta, "finished", "not yet (the study is running, or stopped before its last stage)")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{CSS}</style></head><body>
<h1>{esc(title)}</h1>
{missing}
<h2 id="summary">Summary</h2>
<table class="summary"><thead><tr><th>finding</th><th>value</th><th>what it means</th></tr></thead>
<tbody>{summary}</tbody></table>
{''.join(page.parts)}
<h2 id="provenance">Config, seed, versions, run time</h2>
<p>Seed {esc(str(meta.get('seed')))}, device {esc(str(meta.get('device')))},
started {_when(meta, 'started', 'unknown')}, finished {finished}.
BatchNorm statistics at evaluated points: {esc(str(meta.get('batchnorm_statistics', 'recompute')))}
(applies to networks with BatchNorm only).</p>
<table><thead><tr><th>stage</th><th>seconds</th></tr></thead><tbody>{stage_rows}</tbody></table>
<pre>{esc(json.dumps(meta.get('versions', {}), indent=1, sort_keys=True))}</pre>
<pre>{esc(cfg)}</pre>
<footer>Report generated {stamp} by lossglass from the saved data in this folder.</footer>
<script>{JS}</script>
</body></html>
"""
    path = store.write_text("report.html", doc)
    return str(path)
