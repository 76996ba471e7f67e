"""The dashboard (issue 15): a self-contained offline page of many runs, opened in a real headless browser (Debian's
chromium through Playwright, as tests/test_report_browser.py does), and the live server that follows a running
study; plus the static report's fixes that came with the split into per-protocol layers."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from lossglass.cli import main

from .test_study_cli import _cfg

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
# the SMALL study, lighter where the dashboard does not care (curvature estimators), with a validation split
FAST = ["--quiet", "--set", "data.n_val=100", "--set", "curvature.entropy_chains=40", "--set", "curvature.n_hvp_data=200",
        "--set", "curvature.trace_probes=3", "--set", "curvature.n_samples=2", "--set", "reference.sk_sweeps=100",
        "--set", "reference.steps=50", "--set", "reference.sk_samples=1"]
EVIL = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'


def _browser_ready() -> bool:
    if CHROMIUM is None:
        return False
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


needs_browser = pytest.mark.skipif(not _browser_ready(), reason="chromium or playwright missing (apt-get install "
                                   "chromium; pip install playwright)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two real small runs (one with the reference systems) and a hostile, damaged third folder."""
    root = tmp_path_factory.mktemp("dash")
    cfg = _cfg(root)
    folder = root / "runs"
    assert main(["run", str(cfg), "--out", str(folder / "alpha"), "--stages",
                 "train,walk,connect,replicas,curvature,select,reference", "--set", 'name="alpha"', *FAST]) == 0
    assert main(["run", str(cfg), "--out", str(folder / "beta"), "--stages", "train,walk,connect,replicas,curvature",
                 "--set", 'name="beta"', "--set", "seed=2", "--set", "model.hidden=10", "--set", "connect.widths=[]",
                 "--set", "reference.enabled=false", *FAST]) == 0
    evil = folder / "evil"
    (evil / "tables").mkdir(parents=True)
    shutil.copy(folder / "alpha" / "config.toml", evil / "config.toml")
    (evil / "meta.json").write_text(json.dumps({"name": EVIL, "started": EVIL}))
    (evil / "tables" / "replicas.parquet").write_bytes(b"PAR1 this is not a parquet file")
    (evil / "progress.json").write_text('{"active": true, "pid": 999999999, "stages": {"train": {"state": "runn')
    return folder


def _ids(folder: Path) -> dict[str, str]:
    from lossglass.dashboard.collect import run_id

    return {p.name: run_id(p) for p in folder.iterdir() if p.is_dir()}


# ------------------------------------------------------------------------------------------------ without a browser
def test_static_file_is_offline_escaped_and_marks_damage(runs, tmp_path):
    out = tmp_path / "d.html"
    t0 = time.time()
    assert main(["dashboard", str(runs), "--out", str(out), "--no-open"]) == 0
    seconds = time.time() - t0
    html = out.read_text()
    from lossglass.dashboard.page import plotly_js

    assert html.count(plotly_js()[:2000]) == 1, "plotly.js must be embedded exactly once"
    assert html.count("<script") == 3  # plotly, the data (JSON, not run), the page's own script
    assert EVIL not in html and "<img src=x" not in html
    assert 'src="http' not in html and "<link" not in html  # nothing fetched at view time
    from lossglass.dashboard.collect import collect_run

    evil = collect_run(runs / "evil", 2)
    assert evil["status"] == "damaged" and any("replicas" in p for p in evil["problems"])
    assert [s["state"] for s in evil["stages"] if s["name"] == "train"] != ["running"]  # pid gone, damaged record
    alpha = collect_run(runs / "alpha", 0)
    assert alpha["status"] == "complete", alpha["problems"]
    row = alpha["row"]
    assert row["replicas"]["v"] == 6 and 0 < row["acc_median"]["v"] <= row["acc_best"]["v"] <= 100
    assert row["verdict"]["t"] and row["predictor"]["t"] and row["ship"]["t"].startswith(("replica", "the merged"))
    assert set(alpha["overlays"]) >= {"pq", "perm_barriers", "energy_distance", "spectral_density", "flatness"}
    print(f"dashboard of 3 runs: {out.stat().st_size / 1e6:.1f} MB in {seconds:.1f} s")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path / "nowhere"), "--no-open"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["dashboard", str(tmp_path / "empty"), "--no-open"]) == 2
    assert "holds no lossglass runs" in capsys.readouterr().err


def _get(port: int, path: str, host: str | None = None) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.putrequest("GET", path, skip_host=True)
    c.putheader("Host", host or f"127.0.0.1:{port}")
    c.endheaders()
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, body


def test_server_refuses_paths_outside_the_runs(runs, tmp_path):
    from lossglass.dashboard import DashboardServer

    secret = tmp_path / "secret.txt"
    secret.write_text("not for the browser")
    outside_run = tmp_path / "outside-run"
    shutil.copytree(runs / "beta", outside_run, ignore=shutil.ignore_patterns("tables", "tensors", "*.safetensors"))
    links = [runs / "alpha" / "secret-link", runs / "linked-run"]
    links[0].symlink_to(secret)
    links[1].symlink_to(outside_run, target_is_directory=True)
    server = DashboardServer([runs], 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port, ids = server.port, _ids(runs)
        a = ids["alpha"]
        status, body = _get(port, f"/files/{a}/config.toml")
        assert status == 200 and b"[model]" in body
        for bad in (f"/files/{a}/../../../../../etc/passwd", f"/files/{a}/%2e%2e/%2e%2e/secret.txt",
                    f"/files/{a}/..%2f..%2fsecret.txt", f"/files/{a}/secret-link", f"/files/{a}/tables",
                    f"/files/{a}//etc/passwd"):
            status, body = _get(port, bad)
            assert status in (403, 404), bad
            assert b"not for the browser" not in body and b"root:" not in body
        assert _get(port, "/../../etc/passwd")[0] == 404
        assert _get(port, f"/files/{ids['linked-run']}/config.toml")[0] == 404  # a run linked from elsewhere
        assert _get(port, "/", host="evil.example:80")[0] == 403  # DNS rebinding
        status, body = _get(port, "/api/state")
        names = {r["id"] for r in json.loads(body)["runs"]}
        assert status == 200 and {ids["alpha"], ids["beta"], ids["evil"]} <= names and ids["linked-run"] not in names
        status, body = _get(port, "/api/data")
        assert status == 200 and len(json.loads(body)["runs"]) == 3
    finally:
        server.shutdown()
        server.server_close()
        for link in links:
            link.unlink()


def test_report_layers_read_the_right_columns(runs, monkeypatch, tmp_path):
    """The static report's fixes: aging shows Delta and 1 - C_norm, permutation noise reads 0 on a sensible axis,
    the replicas table appears once, the end time is never 'None'."""
    from lossglass.report import RunView, build_report, connect, walk
    from lossglass.report.base import Page
    from lossglass.store import RunStore

    drawn: dict[str, object] = {}

    def record(self, name, fig, caption):  # draw the figures, skip the slow PNG/SVG encoding
        drawn[name] = [ax.get_ylabel() for ax in fig.axes]
        plt.close(fig)
        self.parts.append(f"<figure>{name}</figure>")

    monkeypatch.setattr(Page, "figure", record)
    html = Path(build_report(runs / "alpha")).read_text()
    assert html.count("<th>seed</th>") == 1 and html.count("<th>lambda_max</th>") >= 1
    assert "finished None" not in html and "started None" not in html
    assert any("Δ" in y for y in drawn["walk_aging"]) and any("C_norm" in y for y in drawn["walk_aging"])
    aging = walk.aging_data(RunView(runs / "alpha"))
    assert aging and all({"Delta", "C_norm"} <= set(g) for curves in aging.values() for g in curves.values())
    # exact zeros with 1e-16 rounding noise: shown as 0, and the axis spans a sensible part of the loss scale
    noisy = RunStore(tmp_path / "noisy")
    noisy.write_table("perm_barriers", pd.DataFrame({"k": [0, 2, 4], "barrier": [0.0, 3e-16, -2e-16],
                                                     "barrier_test": [0.0, 1e-16, 4e-17], "max_loss": [0.5] * 3}))
    d = connect.perm_data(RunView(noisy))
    assert np.all(d.train == 0) and np.all(d.test == 0)
    lo, hi = d.limits
    assert lo <= 0 < hi and hi > 1e-3
    ax = connect.perm_mpl(d).axes[0]
    assert ax.get_ylim()[1] > 1e-3
    plt.close("all")
    store = RunView(runs / "alpha").store
    # a study that has not finished yet says so
    meta = store.read_json("meta.json")
    store.write_json("meta.json", {**meta, "finished": None})
    try:
        html = Path(build_report(runs / "alpha")).read_text()
        assert "finished None" not in html and "finished not yet" in html
    finally:
        store.write_json("meta.json", meta)


# ------------------------------------------------------------------------------------------------ in a browser
def _launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=ARGS)


def _watch(page) -> dict:
    seen = {"errors": [], "dialogs": [], "requests": []}
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
    page.on("request", lambda r: seen["requests"].append(r.url))
    return seen


def _renders(page) -> int:
    return page.evaluate("Number(document.body.dataset.renders || 0)")


def _after(page, action) -> None:
    """Do ``action`` (a click, a navigation) and wait until the page has drawn the view it leads to."""
    n = _renders(page)
    action()
    page.wait_for_function(f"Number(document.body.dataset.renders || 0) > {n}")


def _point(page, selector: str) -> tuple[float, float]:
    box = page.locator(selector).first.bounding_box()
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


PLOTS_OK = """() => Array.from(document.querySelectorAll('.plot')).map(d => {
  const svg = d.querySelector('svg.main-svg'), canvas = d.querySelector('canvas');
  const drawn = d.querySelectorAll('.plot-container path, .plot-container image, .plot-container rect').length;
  const gl = canvas ? canvas.width * canvas.height : 0;
  return [d.id, !!svg && svg.getBoundingClientRect().height > 0 && (drawn > 0 || gl > 0)];
})"""


@needs_browser
def test_dashboard_in_headless_chromium(runs, tmp_path):
    from playwright.sync_api import sync_playwright

    out = tmp_path / "dashboard.html"
    assert main(["dashboard", str(runs / "alpha"), str(runs / "beta"), str(runs / "evil"), "--out", str(out),
                 "--no-open"]) == 0
    ids = _ids(runs)
    a = ids["alpha"]
    with sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        seen = _watch(page)
        _after(page, lambda: page.goto(out.as_uri()))
        # the overview: three rows, the one with a damaged file marked damaged, nothing injected
        assert page.locator("#overview tbody tr").count() == 3
        assert page.locator(f'#overview tr[data-run="{ids["evil"]}"] .badge').inner_text() == "damaged"
        assert page.evaluate("window.pwned") is None
        # sort by best accuracy, both ways, and filter
        col = "#overview tbody td[data-key='acc_best']"

        def values():
            return [float(t) if t else None for t in page.locator(col).all_inner_texts()]

        page.click("#overview th[data-key='acc_best']")
        up = values()
        page.click("#overview th[data-key='acc_best']")
        down = values()
        nums = [v for v in up if v is not None]
        assert len(nums) == 2 and nums == sorted(nums) and [v for v in down if v is not None] == sorted(nums, reverse=True)
        assert up[-1] is None and down[-1] is None  # the run without results sorts last
        page.fill("#filter", "beta")
        assert page.locator("#overview tbody tr").count() == 1
        page.fill("#filter", "")
        # a row opens its run: every plot drawn, the 3-D surfaces included
        _after(page, lambda: page.click(f'#overview tr[data-run="{a}"] td[data-key="model"]'))
        plots = page.evaluate(PLOTS_OK)
        assert len(plots) >= 20 and all(ok for _, ok in plots), [i for i, ok in plots if not ok]
        assert page.locator(f"#{a}-plane_random_surface canvas").count() >= 1
        # hover a replica in the flatness scatter: the tooltip names it
        flat = f"#{a}-flatness_vs_gap"
        page.locator(flat).scroll_into_view_if_needed()
        x, y = _point(page, f"{flat} .scatterlayer .trace .points path")
        page.mouse.move(x, y)
        page.wait_for_selector(f"{flat} .hoverlayer .hovertext")
        tip = page.locator(f"{flat} .hoverlayer .hovertext").first.text_content()
        assert "replica" in tip and "gap" in tip
        # click it: that replica is highlighted in the other linked panels (bars, dendrogram leaves, Parisi matrix)
        replica = int(re.search(r"replica (\d+)", tip).group(1))
        page.mouse.click(x, y)
        page.wait_for_function("document.getElementById('highlight').style.display === 'block'")
        assert f"replica {replica}" in page.locator("#highlight").inner_text()
        bars = page.evaluate(f"document.getElementById('{a}-replicas_accuracy').data[0]")
        assert [bars["customdata"][i] for i in bars["selectedpoints"]] == [replica]
        leaves = page.evaluate(f"document.getElementById('{a}-dendrogram_network-aligned').data[1]")
        assert [leaves["customdata"][i] for i in leaves["selectedpoints"]] == [replica]
        assert page.evaluate(f"document.getElementById('{a}-parisi_network-aligned').layout.shapes.length") == 2
        # side by side: two runs overlaid on shared axes, coloured by run
        _after(page, lambda: page.click("text=← all runs"))
        page.check(f'#overview input[data-run="{a}"]')
        page.check(f'#overview input[data-run="{ids["beta"]}"]')
        _after(page, lambda: page.click("#compare-btn"))
        overlays = page.evaluate("""() => Array.from(document.querySelectorAll('[data-overlay]')).map(d =>
            [d.getAttribute('data-overlay'), Array.from(new Set(d.data.map(t => t.meta.run))).sort()])""")
        assert {k for k, _ in overlays} == {"pq", "perm_barriers", "energy_distance", "spectral_density", "flatness"}
        assert all(r == sorted([a, ids["beta"]]) for _, r in overlays), overlays
        assert all(ok for _, ok in page.evaluate(PLOTS_OK))
        _after(page, lambda: page.select_option("#measure", "weight_norm"))
        assert page.evaluate("document.getElementById('overlay-flatness').layout.xaxis.title.text") == "weight_norm"
        # the damaged run's page says what is wrong instead of breaking
        _after(page, lambda: page.evaluate(f"location.hash = '#run/{ids['evil']}'"))
        assert "incomplete" in page.locator(".problems").inner_text()
        browser.close()
    assert seen["errors"] == [] and seen["dialogs"] == []
    assert all(u.startswith(("file:", "data:", "blob:", "about:")) for u in seen["requests"]), seen["requests"]


#: the live test's bound on each wait: far above what any load needs, it only ends a run that is broken
LIVE_LIMIT_S = 600


@pytest.mark.slow  # a browser, a server and a study in subprocesses: ~3 min on 2 loaded cores
@needs_browser
def test_live_mode_follows_a_running_study(runs, tmp_path):
    from playwright.sync_api import sync_playwright

    folder = tmp_path / "runs"
    folder.mkdir()
    shutil.copytree(runs / "beta", folder / "beta")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "lossglass.cli", "dashboard", str(folder), "--serve", "--port", "0",
                               "--no-open"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    study = None
    try:
        line = server.stdout.readline()
        assert "http://127.0.0.1:" in line, line + server.stderr.read()
        url = line.split()[2]
        with sync_playwright() as p:
            browser = _launch(p)
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            seen = _watch(page)
            _after(page, lambda: page.goto(url))
            assert page.locator("#overview tbody tr").count() == 1
            page.evaluate("window.notReloaded = true")
            study = subprocess.Popen([sys.executable, "-m", "lossglass.cli", "run", str(_cfg(tmp_path)), "--out",
                                      str(folder / "live"), "--stages", "train,walk,connect", "--set", 'name="live"',
                                      "--set", "connect.widths=[]", "--set", "walk.steps=4000", "--set", "walk.record_every=100",
                                      *FAST], env=env)  # a walk of several seconds: several polls see it run
            # bounds far above any load (10 min): they end a broken run, they never time a working one
            page.wait_for_selector("#overview tbody tr:has-text('live')", timeout=LIVE_LIMIT_S * 1000)
            _after(page, lambda: page.click("#overview tbody tr:has-text('live') td[data-key='model']"))
            states: list[dict] = []
            deadline = time.time() + LIVE_LIMIT_S
            ended_at = None
            while time.time() < deadline:
                states.append(page.evaluate("""() => Object.fromEntries(Array.from(
                    document.querySelectorAll('.stage[data-stage]')).map(s => [s.dataset.stage, s.dataset.state]))"""))
                if states[-1].get("connect") == "done":
                    break
                if study.poll() is not None:  # finished: the page needs one more poll (every 1.5 s) to show it
                    ended_at = ended_at or len(states)
                    if len(states) - ended_at > 300:  # 300 reads of 0.2 s after the end: the page never caught up
                        break
                time.sleep(0.2)
            assert study.wait(timeout=LIVE_LIMIT_S) == 0
            walk = [s["walk"] for s in states if "walk" in s]
            assert walk and walk[-1] == "done", walk
            # a stage seen before it finished, and one seen while it ran (the page polls every 1.5 s)
            assert {"pending", "running"} & set(walk), walk
            assert "running" in {v for s in states for v in s.values()}, states
            assert page.evaluate("window.notReloaded") is True  # followed live: the page was never reloaded
            page.wait_for_function("document.querySelectorAll('.plot .main-svg').length > 0")  # new results drawn
            page.wait_for_function("document.querySelector('h2 .badge').textContent !== 'running'")
            browser.close()
        assert seen["errors"] == [] and seen["dialogs"] == []
    finally:
        for proc in (study, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
