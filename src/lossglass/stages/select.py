"""Stage ``select``: which replica to ship, chosen on the validation split by a strategy stated in advance and graded
on the untouched test split (:mod:`lossglass.selection`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import LossglassError
from .base import Stage

if TYPE_CHECKING:
    from ..config import StudyConfig


def measures_only(measure: str) -> bool:
    """Whether ``measure`` is a column only the measures stage writes for the study's replicas (the curvature stage's
    flatness table lacks it): select then reads it from that stage's table."""
    from ..columns import TABLES
    from ..protocols.measures import REPLICA_MEASURES

    return measure in REPLICA_MEASURES and measure not in TABLES["flatness"]


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

    def needs(self, cfg: StudyConfig | None = None) -> tuple[str, ...]:
        """train and curvature, and the measures stage when select.measure is a measure only it computes (so select
        reruns when measures does); other configs keep the fingerprint they had. None: the declared ``depends``."""
        if cfg is not None and measures_only(cfg.select.measure):
            return (*self.depends, "measures")
        return self.depends

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
