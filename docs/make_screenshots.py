"""Screenshots of the dashboard for the README, made with the headless browser the tests use (Debian's chromium
through Playwright).

    .venv/bin/python docs/make_screenshots.py RUNS_DIR [--run NAME]

writes docs/dashboard-overview.png (the overview table) and docs/dashboard-surface.png (one run's loss plane as a
3-D surface, the replicas marked), from a dashboard built for RUNS_DIR.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from lossglass.dashboard import write_dashboard
from lossglass.dashboard.collect import discover, run_id

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


def _after(page, action) -> None:
    n = page.evaluate("Number(document.body.dataset.renders || 0)")
    action()
    page.wait_for_function(f"Number(document.body.dataset.renders || 0) > {n}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", help="a folder of runs")
    ap.add_argument("--run", help="the run whose 3-D surface is shown (default: the first)")
    ap.add_argument("--out", default=str(Path(__file__).parent), help="where the PNGs go (default: docs/)")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    runs = discover([a.runs])
    run = next((p for p in runs if p.name == a.run), runs[0])
    out = Path(a.out)
    with tempfile.TemporaryDirectory() as tmp:
        page_file = write_dashboard([a.runs], Path(tmp) / "dashboard.html")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
            page = browser.new_page(viewport={"width": 1900, "height": 800}, device_scale_factor=1)
            _after(page, lambda: page.goto(page_file.as_uri()))
            page.click("#overview th[data-key='acc_best']")
            page.click("#overview th[data-key='acc_best']")
            box = page.locator("#overview").bounding_box()
            page.screenshot(path=str(out / "dashboard-overview.png"),
                            clip={"x": 0, "y": 0, "width": min(1900, box["x"] + box["width"] + 24),
                                  "height": box["y"] + box["height"] + 24})
            page.set_viewport_size({"width": 1500, "height": 1000})
            _after(page, lambda: page.evaluate(f"location.hash = '#run/{run_id(run)}'"))
            for name in ("plane_through_surface", "plane_random_surface"):
                panel = page.locator(f"#{run_id(run)}-{name}")
                if panel.count():
                    panel.scroll_into_view_if_needed()
                    page.wait_for_timeout(500)
                    panel.locator("xpath=..").screenshot(path=str(out / "dashboard-surface.png"))
                    break
            browser.close()
    print(f"wrote {out / 'dashboard-overview.png'} and {out / 'dashboard-surface.png'}")


if __name__ == "__main__":
    main()
