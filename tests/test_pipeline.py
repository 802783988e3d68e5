"""`moemerge run` on a tiny OLMoE recipe writes model, report and card; the card's table is the report's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_specialists, write_run_recipe

from moemerge.cli import main
from moemerge.diagnose.report import headline_table, load_report


@pytest.mark.parametrize("method", ["task_arithmetic", "regmean"])
def test_run_writes_model_report_and_card(method: str, tmp_path: Path) -> None:
    """regmean: stage 1 is itself a RegMean walk (routers kept), then HARC; the report shows both calibrations."""
    from transformers import AutoModelForCausalLM

    setup = make_specialists("olmoe", tmp_path)
    path = write_run_recipe(setup, tmp_path, method)
    out = tmp_path / "merged"
    assert main(["run", str(path), "-o", str(out), "--quiet"]) == 0

    assert (tmp_path / "merged.stage1" / "model.safetensors").is_file()
    report = load_report(out / "report")
    data = json.loads((out / "report" / "report.json").read_text())
    assert data and list((out / "report").glob("*.png"))
    assert headline_table(report).strip() in (out / "README.md").read_text()
    AutoModelForCausalLM.from_pretrained(out)
    calibrated = report.calibrations["merged"]
    assert calibrated.has_harc and not calibrated.has_experts
    if method == "regmean":
        stage1 = report.calibrations["merged.stage1"]
        assert stage1.has_experts and not stage1.has_harc
        assert "`regmean`" in (tmp_path / "merged.stage1" / "README.md").read_text()
    else:
        assert "merged.stage1" not in report.calibrations
