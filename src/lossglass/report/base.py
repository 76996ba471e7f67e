"""What every figure layer shares: a read-only view of a run folder (:class:`RunView`), the palette and matplotlib
style, number formatting, HTML escaping and tables, and the two containers the layers fill: :class:`Page` (a section
of the static report) and :class:`Panel` (one interactive figure of the dashboard).

Nothing here computes physics: it reads what the study saved and arranges it for drawing.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..errors import LossglassError  # noqa: E402
from ..stages import REGISTRY, STAGE_ORDER, stage  # noqa: E402
from ..store import RunStore  # noqa: E402

# Okabe-Ito: colour-blind-safe
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
STYLE = {"figure.dpi": 110, "savefig.dpi": 110, "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
         "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
         "axes.prop_cycle": matplotlib.cycler(color=PALETTE), "svg.hashsalt": "lossglass", "image.cmap": "viridis"}
esc = html.escape


def fmt(v: Any) -> str:
    """A number in 4 significant digits (``nan`` for non-finite), anything else as escaped text."""
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "nan"
        return f"{v:.4g}"
    return esc(str(v))


def html_table(df: pd.DataFrame, cls: str = "sortable") -> str:
    """An HTML table of ``df``, every cell escaped."""
    head = "".join(f"<th>{esc(str(c))}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>" for row in df.itertuples(index=False))
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def finite(x: Any) -> bool:
    """Whether ``x`` is a finite real number."""
    try:
        return bool(np.isfinite(float(x)))
    except (TypeError, ValueError):
        return False


class RunView:
    """A read-only view of one run folder for drawing: each table and JSON record is read once (bytes read once,
    bounded in size and nesting by :mod:`lossglass.store`, parsed from memory) and kept; a damaged, oversized or
    unreadable file is noted in :attr:`problems` and read as absent, so one bad file never breaks a page. Nothing is
    written, and the folder's writer lock is never taken."""

    def __init__(self, run: RunStore | str | Path):
        self.store = run if isinstance(run, RunStore) else RunStore(run, create=False)
        self.path = self.store.path
        self.problems: list[str] = []
        #: the files that could not be read (damaged, oversized, not plain files), in words: a subset of problems
        self.damaged: list[str] = []
        self._tables: dict[str, pd.DataFrame | None] = {}
        self._json: dict[str, Any] = {}
        self._config: dict | None = None

    def __repr__(self) -> str:
        return f"RunView({str(self.path)!r})"

    def _note(self, what: str) -> None:
        """Note a file that could not be read."""
        if what not in self.problems:
            self.problems.append(what)
        if what not in self.damaged:
            self.damaged.append(what)

    def table(self, name: str) -> pd.DataFrame | None:
        """The table ``name`` (None when absent or damaged; a damaged one is noted in ``problems``)."""
        if name not in self._tables:
            t = None
            if self.store.has_table(name):
                try:
                    t = self.store.read_table(name)
                except Exception as e:  # noqa: BLE001 - a damaged table is reported, not fatal
                    self._note(f"table {name} unreadable ({e})")
            self._tables[name] = t
        return self._tables[name]

    def json(self, name: str, default: Any = None) -> Any:
        """The JSON record ``name`` (``default`` when absent or damaged)."""
        if name not in self._json:
            try:
                self._json[name] = self.store.read_json(name)
            except (LossglassError, OSError) as e:
                self._note(str(e))
                self._json[name] = None
        v = self._json[name]
        return default if v is None else v

    @property
    def is_run(self) -> bool:
        """Whether the folder holds a run (a config and a meta record)."""
        return self.store.is_run()

    @property
    def meta(self) -> dict:
        m = self.json("meta.json", {})
        return m if isinstance(m, dict) else {}

    @property
    def config(self) -> dict:
        """The run's config.toml as a plain dict ({} when absent or damaged)."""
        if self._config is None:
            self._config = {}
            if (self.path / "config.toml").is_file():
                from ..config import parse_toml

                try:
                    self._config = parse_toml(self.store.read_bytes("config.toml").decode("utf-8", "replace"),
                                              "config.toml")
                except (LossglassError, OSError) as e:
                    self._note(f"config.toml could not be read ({e})")
        return self._config

    def config_text(self) -> str:
        try:
            return self.store.read_bytes("config.toml").decode("utf-8", "replace")
        except (LossglassError, OSError):
            return "(no config)"

    @property
    def name(self) -> str:
        """The run's name (meta.json's, at most 200 characters; else the folder's)."""
        n = self.meta.get("name")
        return (str(n) if len(str(n)) <= 200 else str(n)[:200] + "...") if n else self.path.name

    def enabled(self, name: str) -> bool:
        """Whether a run of the folder's config includes stage ``name`` (the config's defaults where it does not say)."""
        return stage(name).wanted_raw(self.config)

    def stages(self) -> dict[str, dict]:
        """Completion records in run order ({} and a note when one is damaged)."""
        try:
            return self.store.stages(STAGE_ORDER)
        except (LossglassError, OSError) as e:
            self._note(str(e))
            return {}

    def progress(self) -> dict | None:
        """``progress.json`` as the study wrote it (None when absent or damaged)."""
        p = self.json("progress.json")
        return p if isinstance(p, dict) else None

    def alive_ids(self) -> list[int]:
        """Replica ids of the replicas that did not diverge, in table order: the protocols' replica index i is the
        i-th of these."""
        t = self.table("replicas")
        if t is None or "replica" not in t:
            return []
        ok = t[~t["diverged"].astype(bool)] if "diverged" in t else t
        return [int(r) for r in ok["replica"]]

    def missing(self) -> list[str]:
        """What the run lacks: unfinished or skipped stages and unreadable records, in words."""
        out = []
        if not self.store.has_tensors("replicas"):
            out.append("replicas.safetensors (stage train not finished)")
        if not self.config:
            out.append("config.toml could not be read")
        stages = self.stages()
        for st in REGISTRY:
            if st.name == "train" or not st.tables or (self.config and not self.enabled(st.name)):
                continue
            if st.name not in stages:
                out.append(f"stage {st.name} not finished (tables: {', '.join(st.tables)})")
            elif st.skip_is_missing and isinstance(stages[st.name], dict) and stages[st.name].get("skipped"):
                out.append(f"stage {st.name} skipped: {stages[st.name]['skipped']}")
        return out


@dataclass
class Panel:
    """One interactive figure of the dashboard: a plotly figure with its title and caption (plain text; the page
    escapes it). ``link`` names the replicas its points stand for: a click on a replica highlights it in every
    panel of the same run with the same link. ``width`` is "full" or "half" (two halves share a row)."""

    id: str
    title: str
    caption: str
    figure: Any
    link: str | None = None
    width: str = "full"


@dataclass
class Page:
    """The static report being written: HTML parts in order, summary rows, and what is missing."""

    view: RunView
    parts: list[str] = field(default_factory=list)
    summary: list[tuple[str, str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def store(self) -> RunStore:
        return self.view.store

    def table(self, name: str) -> pd.DataFrame | None:
        return self.view.table(name)

    def figure(self, name: str, fig, caption: str) -> None:
        """Save ``fig`` as ``figures/NAME.png|svg`` (through the store) and embed the PNG; ``caption`` is HTML."""
        png, svg = io.BytesIO(), io.BytesIO()
        fig.savefig(png, format="png", bbox_inches="tight", metadata={"Software": None})
        fig.savefig(svg, format="svg", bbox_inches="tight", metadata={"Date": None})
        plt.close(fig)
        data = png.getvalue()
        # through the store: atomic (no half-written figure on a full disk), never through a link out of the folder
        self.store.write_bytes(f"figures/{name}.svg", svg.getvalue())
        self.store.write_bytes(f"figures/{name}.png", data)
        b64 = base64.b64encode(data).decode()
        self.parts.append(f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{b64}">'
                          f"<figcaption>{caption}</figcaption></figure>")

    def h(self, level: int, text: str, anchor: str | None = None) -> None:
        a = f' id="{esc(anchor)}"' if anchor else ""
        self.parts.append(f"<h{level}{a}>{esc(text)}</h{level}>")

    def p(self, text: str) -> None:
        """A paragraph; ``text`` is HTML (escape what comes from the run folder)."""
        self.parts.append(f"<p>{text}</p>")

    def df(self, df: pd.DataFrame, max_rows: int = 40, cls: str = "sortable") -> None:
        self.parts.append(html_table(df.head(max_rows), cls))
        if len(df) > max_rows:
            self.p(f"<em>First {max_rows} of {len(df)} rows; the full table is in the run folder.</em>")

    def add_summary(self, what: str, value: str, meaning: str) -> None:
        self.summary.append((what, value, meaning))


def layers() -> list[tuple[str, str, Any, bool]]:
    """The drawing layers of the stages in run order: ``(layer name, heading, module, on the dashboard)`` for each
    stage that declares one (:attr:`lossglass.stages.base.Stage.report`: a module of this package and a heading)."""
    import importlib

    return [(st.report[0], st.report[1], importlib.import_module(f"{__package__}.{st.report[0]}"), st.dashboard)
            for st in REGISTRY if st.report]


def integer_ticks(ax) -> None:
    """Integer tick labels on the x axis (replica ids)."""
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


# ------------------------------------------------------------------------------------------------ plotly helpers
def plotly_layout(**kw) -> dict:
    """The layout every dashboard figure starts from (the page supplies the template)."""
    base = {"margin": {"l": 60, "r": 20, "t": 30, "b": 50}, "height": 360, "hovermode": "closest",
            "legend": {"font": {"size": 10}}}
    base.update(kw)
    return base


def go_figure(traces: list, **layout):
    """A plotly figure from traces and layout keys, without the default template (the page supplies one, once)."""
    import plotly.graph_objects as go

    fig = go.Figure(data=traces, layout=plotly_layout(**layout))
    fig.layout.template = None
    return fig


def text(s: Any) -> str:
    """Run-folder text placed in a plotly label: ``<``, ``>`` and ``&`` escaped, so plotly's pseudo-HTML (tags, links)
    never interprets it; plotly shows the entities as the characters."""
    return html.escape(str(s), quote=False)
