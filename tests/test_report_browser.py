"""The report opened in a real headless browser (Debian's chromium, installed by .ci/run)."""

import math
import shutil

import pytest

from .test_study_cli import _cfg

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_loads_cleanly_in_headless_chromium(tmp_path):
    from lossglass.cli import main

    out = tmp_path / "run"
    assert main(["run", str(_cfg(tmp_path)), "--out", str(out), "--quiet"]) == 0
    errors = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((out / "report.html").as_uri())
        page.wait_for_load_state("load")
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        cells = page.eval_on_selector_all("table.summary tbody td:nth-child(2)", "tds => tds.map(t => t.textContent)")
        page.click("table.sortable th")  # the sorter runs without errors
        shot = tmp_path / "shot.png"
        page.screenshot(path=str(shot), full_page=False)
        browser.close()
    assert errors == []
    assert len(widths) >= 10 and all(w > 0 for w in widths)
    assert cells, "empty summary"
    numbers = []
    for c in cells:
        for tok in c.replace("%", " ").replace(",", " ").replace("→", " ").replace("/", " ").split():
            try:
                numbers.append(float(tok))
            except ValueError:
                pass
    assert numbers and all(math.isfinite(x) for x in numbers)
    from PIL import Image

    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100  # not a blank page
