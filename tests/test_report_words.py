"""The report's words follow its numbers: a hierarchical and a structureless set of replicas get different, right
sentences (issue 12)."""

import re

import numpy as np
import pandas as pd

from lossglass.config import load_config
from lossglass.protocols.replicas import analyse_overlaps
from lossglass.report import build_report
from lossglass.stages.replicas import write_analysis
from lossglass.study import Study

from .test_run_folder import _tiny


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _nested(rng, dim=200):
    pts = []
    for _ in range(3):
        a = rng.normal(0, 1, dim)
        for _ in range(3):
            b = a + rng.normal(0, 0.6, dim)
            for _ in range(4):
                pts.append(b + rng.normal(0, 0.25, dim))
    return _unit(np.array(pts))


def _report_of(tmp_path, name, x):
    study = Study(load_config(_tiny(tmp_path)), tmp_path / name, progress=False)
    study.prepare()
    a = analyse_overlaps(np.clip(x @ x.T, -1, 1), label="network-aligned")
    write_analysis(study.store, a)
    summary = [a.row]
    study.store.write_table("replica_summary", pd.DataFrame(summary))
    study.store.write_table("pq", pd.DataFrame({"label": "network-aligned", "q": a.pq}))
    html = open(build_report(study.store)).read()
    return html, summary[0]


def _summary_rows(html):
    body = html.split('<table class="summary">')[1].split("</table>")[0]
    return re.sub(r"<[^>]+>", " ", body)


def test_words_differ_for_a_tree_and_for_a_structureless_cloud(tmp_path):
    rng = np.random.default_rng(0)
    tree_html, tree = _report_of(tmp_path, "tree", _nested(rng))
    flat_html, flat = _report_of(tmp_path, "flat", _unit(rng.normal(size=(36, 200))))
    assert tree["verdict"] == "nested" and tree["levels"] >= 2 and tree["z"] < -3
    assert flat["verdict"] in ("no evidence", "trivial") and abs(flat["z"]) < 3
    t, f = _summary_rows(tree_html), _summary_rows(flat_html)
    assert "clusters within clusters" in t and "as a Parisi tree" in t and "no evidence" not in t
    assert "no evidence of clusters or a tree" in f or "trivially ultrametric" in f
    assert "clusters within clusters" not in f and "Parisi tree" not in f
    # the numbers quoted are the run's own
    assert f"{tree['K_mean']:.3f}" in t and f"{flat['K_mean']:.3f}" in f
