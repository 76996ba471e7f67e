"""The golden run (tests/golden/golden_run.py): a small study through every stage must leave the run folder that
tests/golden/small_run.json describes. On the machine and build that wrote the digest, every byte is compared
(tables, tensors, figures, the report, the manifest); elsewhere, what does not depend on floating-point roundoff:
the files written, the stage fingerprints, the names of every task and checkpoint, and the table schemas.

A change that means to alter results regenerates the digest (``python tests/golden/golden_run.py --write``) and says
so in its commit; a refactoring never does."""

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "golden"
sys.path.insert(0, str(HERE))
import golden_run  # noqa: E402

REGEN = "if the change is meant to alter results, regenerate with: python tests/golden/golden_run.py --write"


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    want = json.loads((HERE / "small_run.json").read_text())
    got = golden_run.run(tmp_path_factory.mktemp("golden") / "run")
    return want, got


def test_the_golden_run_writes_the_same_files_fingerprints_and_tasks(golden):
    want, got = golden
    assert sorted(got["files"]) == sorted(want["files"]), REGEN
    assert got["stages"] == want["stages"], REGEN
    assert got["inputs"] == want["inputs"], REGEN
    assert got["claimed"] == want["claimed"], REGEN
    assert got["manifest"] == want["manifest"], REGEN
    assert got["schemas"] == want["schemas"], REGEN


def test_the_golden_run_gives_the_same_bytes_on_the_machine_that_wrote_it(golden):
    want, got = golden
    if got["machine"] != want["machine"]:
        pytest.skip(f"digest written on {want['machine']}, this is {got['machine']}: bytes are compared there only")
    differ = sorted(k for k in want["files"] if got["files"].get(k) != want["files"][k])
    assert not differ, f"files with other bytes: {differ}; {REGEN}"
