"""Stage ``select``: which replica to ship, chosen on the validation split by a strategy stated in advance and graded
on the untouched test split (:mod:`lossglass.selection`)."""

from __future__ import annotations

from ..errors import LossglassError
from .base import Stage


class SelectStage(Stage):
    name = "select"
    position = 70
    section = "select"
    sections = ("select",)
    depends = ("train", "curvature")
    tables = ("selection",)
    report = ("selection", "Which model to ship")
    dashboard = False
    skip_is_missing = False  # it never fails a run: a skip says what it needs, in the selection section

    def run(self, ctx) -> dict:
        """Never fails the study: when it cannot choose, it says why and is skipped."""
        from ..selection import select

        if not (ctx.store.has_table("flatness") or ctx.store.has_table("measures")):
            return {"skipped": "no curvature or measures results (enable the curvature stage)"}
        try:
            d = select(ctx.store, ctx.problem)
        except LossglassError as e:
            return {"skipped": str(e)}
        return {"replica": d.get("replica")}
