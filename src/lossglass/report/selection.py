"""Which model to ship (``selection.json`` and table ``selection``, written by the select stage): one paragraph,
the table of strategies, a summary row and the overview cell. Kept on its own so it can be rewritten without
touching the figure layers; it reads the decision and never recomputes it."""

from __future__ import annotations

from .base import Page, RunView, esc


def decision(view: RunView) -> dict | None:
    d = view.json("selection.json")
    return d if isinstance(d, dict) and "replica" in d else None


def _accuracy(d: dict) -> float | None:
    v = d.get("test_accuracy", d.get("chosen_test_accuracy"))
    return float(v) if isinstance(v, (int, float)) else None


def what(d: dict) -> str:
    """``replica 3 (91.20%)`` or ``the merged model (91.50%)``."""
    acc = _accuracy(d)
    who = f"replica {d['replica']}" if d.get("replica") is not None else "the merged model"
    return who + (f" ({acc * 100:.2f}%)" if acc is not None else "")


def paragraph(d: dict) -> str:
    """The decision in words (plain text), from :func:`lossglass.selection.explain`."""
    from ..selection import explain

    try:
        text = explain(d)
    except (KeyError, TypeError, ValueError):  # a selection.json written by another lossglass version
        text = f"Ship {what(d)}" + (f", chosen by {d['strategy']}" if d.get("strategy") else "") + "."
    if d.get("exported"):
        text += f" The chosen model is exported as {d['exported']} (a safetensors state_dict for your model)."
    return text


def summary(view: RunView) -> list[tuple[str, str, str]]:
    d = decision(view)
    if d is None:
        return []
    rule = d.get("strategy") or (f"flattest by {d['measure']}" if d.get("measure") else "the select stage")
    verdict = d.get("verdict")
    meaning = f"Chosen by {rule}"
    lo, hi = (d.get("interval") or {}).get(d.get("strategy"), (float("nan"), float("nan")))
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo == lo and hi == hi:  # not NaN
        meaning += f"; the rule's expected test accuracy on new data is {lo * 100:.1f}-{hi * 100:.1f}% (95%)"
    said = {"helped": "flatness helped beyond validation accuracy", "hurt": "flatness did worse than validation "
            "accuracy alone", "nothing detectable": "flatness added nothing detectable over validation accuracy"}
    meaning += (f"; {said.get(verdict, f'flatness: {verdict}, compared with validation accuracy')} on this run's "
                "test split." if verdict else ".")
    return [("Model to ship", what(d), meaning)]


def section(page: Page) -> None:
    d = decision(page.view)
    if d is None:
        return
    page.h(2, "Which model to ship", "select")
    page.p(esc(paragraph(d)))
    sel = page.table("selection")
    if sel is not None:
        page.df(sel, max_rows=12)
    for row in summary(page.view):
        page.add_summary(*row)


def dashboard(view: RunView) -> dict | None:
    """What the dashboard shows: the paragraph and the table (plain values; the page escapes them)."""
    d = decision(view)
    if d is None:
        return None
    sel = view.table("selection")
    rows = [] if sel is None else [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r]
                                   for r in sel.head(12).itertuples(index=False)]
    return {"text": paragraph(d), "columns": [] if sel is None else [str(c) for c in sel.columns], "rows": rows}


def overview(view: RunView) -> dict:
    d = decision(view)
    if d is None:
        return {}
    return {"ship": what(d)}
