"""Stage ``report``: figures and ``report.html`` from the saved tables (always redone: it only reads)."""

from __future__ import annotations

import time

from .base import Stage


class ReportStage(Stage):
    name = "report"
    position = 90
    section = None

    def run(self, ctx) -> dict:
        from . import STAGE_ORDER

        store = ctx.store
        meta = store.read_json("meta.json", {})
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta["stage_seconds"] = {k: v.get("seconds") for k, v in store.stages(STAGE_ORDER).items()}
        store.write_json("meta.json", meta)
        ctx.draw_report(store)
        return {}
