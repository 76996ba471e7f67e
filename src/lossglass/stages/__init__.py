"""The stages of a study, in run order: one module per stage, each declaring its name, config section, what its
results depend on, its tables, its tasks and how they are gathered (:class:`~lossglass.stages.base.Stage`).

Everything that lists stages derives from :data:`REGISTRY`: the run order (:data:`STAGE_ORDER`), the dependencies
(:func:`dependents`), the CLI's per-protocol sub-commands, the report's sections and the dashboard's layers, the
column descriptions a stage adds and the resource estimate. A new stage is one module in this package: its
``position`` places it in the run order (train 10, timeline 20, walk 30, connect 40, replicas 50, curvature 60,
select 70, reference 80, report 90).
"""

from __future__ import annotations

import importlib
import os
import pkgutil

from ..errors import check
from .base import Stage, Task, TaskContext, TaskEnv, TaskOutput

#: environment variable naming extra modules (comma-separated, importable) whose stages join every study
ENV_STAGES = "LOSSGLASS_STAGES"


def discover(modules=None) -> tuple[Stage, ...]:
    """One instance of every :class:`Stage` subclass defined in the modules of this package and in the modules named
    by ``LOSSGLASS_STAGES`` (or in ``modules``), ordered by its ``position``: adding a stage is adding one module."""
    if modules is None:
        names = [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if m.name not in ("base", "common")]
        names += [n.strip() for n in os.environ.get(ENV_STAGES, "").split(",") if n.strip()]
        modules = []
        for n in names:
            try:
                modules.append(importlib.import_module(n))
            except ImportError as e:
                raise ImportError(f"{ENV_STAGES} names {n!r}, which cannot be imported: {e}") from e
    found = {cls for mod in modules for cls in vars(mod).values()
             if isinstance(cls, type) and issubclass(cls, Stage) and cls is not Stage and cls.__module__ == mod.__name__}
    out = sorted((cls() for cls in found), key=lambda st: (st.position, st.name))
    names = [st.name for st in out]
    check(len(set(names)) == len(names), f"two stages share a name: {names}")
    return tuple(out)


#: every stage, in run order
REGISTRY: tuple[Stage, ...] = discover()
#: the stage names in run order (run folders order their records by it too)
STAGE_ORDER: tuple[str, ...] = tuple(s.name for s in REGISTRY)
_BY_NAME = {s.name: s for s in REGISTRY}


def stage(name: str) -> Stage:
    """The stage called ``name``."""
    check(name in _BY_NAME, f"unknown stage {name!r}; stages: {', '.join(STAGE_ORDER)}")
    return _BY_NAME[name]


def dependents(name: str, cfg=None) -> set[str]:
    """``name`` and every stage whose results depend on it (under ``cfg``; None: the declared ``depends``)."""
    out, changed = {name}, True
    while changed:
        changed = False
        for s in REGISTRY:
            if s.name not in out and out & set(s.needs(cfg)):
                out.add(s.name)
                changed = True
    return out


def dependencies(name: str, cfg=None) -> set[str]:
    """``name`` and every stage it depends on (under ``cfg``; None: the declared ``depends``)."""
    out, todo = set(), [name]
    while todo:
        s = todo.pop()
        if s not in out:
            out.add(s)
            todo += list(stage(s).needs(cfg))
    return out


__all__ = ["REGISTRY", "STAGE_ORDER", "Stage", "Task", "TaskContext", "TaskEnv", "TaskOutput", "dependencies",
           "dependents", "stage"]
