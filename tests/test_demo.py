"""The README's main command (examples/specialists/demo.py) on the shipped specialists, end to end.

Checks that its one table holds every step in the story's order and that each number in it is the
one `diagnose` wrote to report.json (not recomputed elsewhere), that no two rows repeat each other,
and that the lines under the table quote the same report.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _demo():
    spec = importlib.util.spec_from_file_location("specialists_demo", ROOT / "examples" / "specialists" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import contextlib
    import io

    demo = _demo()
    out = tmp_path_factory.mktemp("demo") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert demo.main(["-o", str(out), "--quiet"]) == 0
    return {"demo": demo, "out": out, "printed": printed.getvalue()}


def _table(printed: str) -> list[list[str]]:
    lines = [line for line in printed.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if not set(line) <= set("|-: ")]


def test_table_rows_are_the_story_and_match_report_json(demo_run: dict) -> None:
    report = json.loads((demo_run["out"] / "report" / "report.json").read_text())
    table = _table(demo_run["printed"])
    header, rows = table[0], table[1:]
    labels = [row[0] for row in rows]
    assert labels == [
        "base",
        "stage 1 (task_arithmetic)",
        "+ HARC",
        "+ experts + HARC",
        "stage 1 (task_arithmetic) + oracle routers",
        "source (reference)",
    ]
    domains = [d["name"] for d in report["domains"]]
    assert header[1:-1] == [c for d in domains for c in (f"{d} loss", f"{d} agreement")]
    by_key = {(e["model"], e["domain"], e["role"]): e for e in report["evaluations"]}
    for row in rows[:-1]:
        role = "oracle" if row[0].endswith("+ oracle routers") else "candidate"
        for k, domain in enumerate(domains):
            evaluation = by_key[(row[0], domain, role)]
            source = by_key[(domain, domain, "source")]
            loss, delta = re.fullmatch(r"(\S+) \((\S+)\)", row[1 + 2 * k]).groups()
            assert float(loss) == pytest.approx(evaluation["loss"], abs=5e-5)
            assert float(delta) == pytest.approx(evaluation["loss"] - source["loss"], abs=5e-5)
            agreement = sum(la["agreement"] for la in evaluation["layers"]) / len(evaluation["layers"])
            assert float(row[2 + 2 * k]) == pytest.approx(agreement, abs=5e-4)
    assert [float(rows[-1][1 + 2 * k]) for k in range(len(domains))] == pytest.approx(
        [by_key[(d, d, "source")]["loss"] for d in domains], abs=5e-5
    )
    assert len({tuple(row[1:]) for row in rows}) == len(rows), "two rows repeat the same numbers"


def test_story_lines_quote_the_report(demo_run: dict) -> None:
    """The gap fractions under the table, recomputed by hand from report.json."""
    report = json.loads((demo_run["out"] / "report" / "report.json").read_text())
    loss = {(e["model"], e["domain"], e["role"]): e["loss"] for e in report["evaluations"]}
    domains = [d["name"] for d in report["domains"]]
    stage1 = "stage 1 (task_arithmetic)"

    def recovered(model: str, role: str = "candidate") -> float:
        closed = [
            (loss[(stage1, d, "candidate")] - loss[(model, d, role)])
            / (loss[(stage1, d, "candidate")] - loss[(d, d, "source")])
            for d in domains
        ]
        return sum(closed) / len(closed)

    printed = demo_run["printed"]
    assert f"{recovered('+ HARC'):.2f} of the stage-1 gap closed" in printed
    assert f"close {recovered(stage1 + ' + oracle routers', 'oracle'):.2f}" in printed
    assert f"{recovered('+ experts + HARC'):.2f} of the gap closed" in printed
    assert (demo_run["out"] / "config.json").is_file() and (demo_run["out"] / "moemerge_calibration.json").is_file()
