"""diagnose: routing metrics on hand-computed cases, loss equal to transformers', the CLI end to end, oracle routers,
calibration summaries carried into the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_specialists

from moemerge.architectures.layout import load_layout
from moemerge.architectures.records import RouterKind
from moemerge.calibrate.options import CalibrationOptions
from moemerge.calibrate.runner import SUMMARY_FILE, Domain, calibrate
from moemerge.checkpoint.card import model_card
from moemerge.checkpoint.reader import CheckpointReader
from moemerge.checkpoint.writer import CheckpointWriter
from moemerge.cli import main
from moemerge.data import DataOptions, batches
from moemerge.diagnose.evaluate import evaluate, heldout_text
from moemerge.diagnose.metrics import RoutingTally, expert_load, load_entropy, routing_kl
from moemerge.diagnose.options import DiagnoseOptions
from moemerge.diagnose.report import Calibration, Report, calibration_table, headline_table, load_report

DATA = ["--max-length", "64", "--heldout", "4", "--batch-tokens", "256"]
OPTIONS = DiagnoseOptions(data=DataOptions(max_length=64, heldout=4), batch_tokens=256)


@pytest.mark.parametrize("kind", list(RouterKind))
def test_identical_routers_agree_fully(kind: RouterKind) -> None:
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(8, generator=torch.Generator().manual_seed(1)) if kind == RouterKind.SIGMOID else None
    tally = RoutingTally(0, 8, 2, kind)
    tally.update(logits[:20], logits[:20], bias, bias)
    tally.update(logits[20:], logits[20:], bias, bias)
    result = tally.result()
    assert (result.tokens, result.agreement, result.exact_match, result.kl) == (50, 1.0, 1.0, 0.0)
    assert sum(result.load) == pytest.approx(1.0)


def test_permuted_experts_agreement_by_hand() -> None:
    # source router W = I (4 experts, d = 4); the candidate's rows are W's with experts 0 and 2 swapped
    source_w = torch.eye(4)
    candidate_w = source_w[[2, 1, 0, 3]]
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 1.0, 3.0]])
    # source top-2: {0, 1}, {2, 3}, {1, 3}; candidate top-2: {1, 2}, {0, 3}, {1, 3} -> 1/2, 1/2, 1
    tally = RoutingTally(0, 4, 2, RouterKind.SOFTMAX)
    tally.update(x @ source_w.T, x @ candidate_w.T)
    result = tally.result()
    assert result.agreement == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert result.exact_match == pytest.approx(1 / 3)

    # KL by hand: token 3 is unchanged by the swap (x_0 = x_2), tokens 1 and 2 swap two logits
    def kl(p_logits: list[float], q_logits: list[float]) -> float:
        zp, zq = sum(math.exp(v) for v in p_logits), sum(math.exp(v) for v in q_logits)
        return sum(
            math.exp(a) / zp * (a - math.log(zp) - b + math.log(zq)) for a, b in zip(p_logits, q_logits, strict=True)
        )

    expected = (kl([4, 3, 2, 1], [2, 3, 4, 1]) + kl([1, 2, 3, 4], [3, 2, 1, 4]) + 0.0) / 3
    assert result.kl == pytest.approx(expected, rel=1e-12)
    # candidate assignments {1,2}, {0,3}, {1,3}: expert 1 and 3 twice, 0 and 2 once, of 6
    assert result.load == pytest.approx([1 / 6, 2 / 6, 1 / 6, 2 / 6])


def test_sigmoid_kl_is_a_sum_of_bernoulli_kls() -> None:
    reference = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    candidate = torch.tensor(
        [[math.log(3.0), 0.0]], dtype=torch.float64
    )  # sigmoid 0.5 -> 0.75 on expert 0, expert 1 unchanged
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert routing_kl(reference, candidate, RouterKind.SIGMOID).item() == pytest.approx(expected, rel=1e-12)
    # the softmax kinds use the softmax over all experts: [1/2, 1/2] vs [3/4, 1/4]
    for kind in (RouterKind.SOFTMAX, RouterKind.TOPK_SOFTMAX):
        assert routing_kl(reference, candidate, kind).item() == pytest.approx(expected, rel=1e-12)


def test_expert_load_and_entropy_of_a_known_assignment() -> None:
    load = expert_load(torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]]), 4)
    assert load.tolist() == [0.5, 0.25, 0.125, 0.125]
    assert load_entropy(load) == pytest.approx(1.75 * math.log(2))
    assert load_entropy([0.25] * 4) == pytest.approx(math.log(4))
    assert load_entropy([1.0, 0.0, 0.0]) == 0.0


def _with_routers_of(body: Path, routers: Path, out: Path) -> Path:
    """`body` with every router tensor (weight, bias, selection bias) replaced by `routers`' own.

    Its calibration summary records router solves only (made-up iterations, layer 1 not converged), and its
    model card says it was calibrated without held-out text, which diagnose must warn about.
    """
    layout = load_layout(body)
    swapped = layout.router_tensors | layout.selection_biases
    keep, take = CheckpointReader(body), CheckpointReader(routers)
    with CheckpointWriter(out) as writer:
        for name in keep.names():
            writer.add(name, (take if name in swapped else keep).read(name))
        writer.copy_support_files(body)
        recipe = json.dumps({"calibrate": {"data": {"heldout": 0, "seed": 0}}})
        harc = [{"layer": m.index, "iterations": 5 + m.index, "converged": m.index != 1} for m in layout.moe_layers]
        writer.write_text(SUMMARY_FILE, json.dumps({"layers": harc}))
        writer.write_text("README.md", model_card(recipe=recipe, sources=[str(routers)], base=None, summary="test"))
        writer.finalize()
    return out


@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One CLI run: candidates average, source0, average-with-source0's-routers, and average calibrated with
    experts (min_tokens 400: some experts of each layer are kept at stage 1); oracle routers on."""
    root = tmp_path_factory.mktemp("diagnose")
    setup = make_specialists("olmoe", root)
    setup["hybrid"] = _with_routers_of(setup["average"], setup["sources"][0], root / "hybrid")
    calibration = CalibrationOptions(experts=True, regmean={"min_tokens": 400}, data=OPTIONS.data, batch_tokens=256)
    domains = [Domain(str(s), (str(f),)) for s, f in zip(setup["sources"], setup["data"], strict=True)]
    setup["calibrated"] = calibrate(str(setup["average"]), domains, root / "calibrated", calibration, progress=False)
    setup["out"] = root / "report"
    argv = ["diagnose", "-o", str(setup["out"]), "--oracle-routers", "--quiet", *DATA]
    for model in (setup["average"], setup["sources"][0], setup["hybrid"], setup["calibrated"]):
        argv += ["--model", str(model)]
    for source, data in zip(setup["sources"], setup["data"], strict=True):
        argv += ["--source", str(source), "--data", f"{source}={data}"]
    setup["argv"] = argv
    assert main(argv) == 0
    return setup


def test_cli_writes_report_markdown_and_plots(diagnosed: dict) -> None:
    out = diagnosed["out"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    expected = [
        "agreement_per_layer",
        "loss_per_domain",
        "expert_load_average",
        "expert_load_source0",
        "expert_load_hybrid",
        "expert_load_calibrated",
    ]
    assert pngs == sorted(f"{name}.png" for name in expected)
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, png
    assert not list(out.parent.glob(".report.tmp-*")), "the temporary folder was left behind"

    data = json.loads((out / "report.json").read_text())
    assert "own forward pass" in data["method"]["routing"] and "softmax" in data["method"]["kl"]
    assert data["stage1"] == "average"
    report = load_report(out)
    assert [(m, r) for m, r in report.rows()] == [
        ("average", "candidate"),
        ("average + oracle routers", "oracle"),
        ("source0", "candidate"),
        ("source0 + oracle routers", "oracle"),
        ("hybrid", "candidate"),
        ("hybrid + oracle routers", "oracle"),
        ("calibrated", "candidate"),
        ("calibrated + oracle routers", "oracle"),
    ]
    layout = load_layout(diagnosed["average"])
    for domain, source, files in zip(report.domains, diagnosed["sources"], diagnosed["data"], strict=True):
        held = heldout_text(Domain(str(source), (str(files),)), OPTIONS)
        assert (domain.heldout_samples, domain.heldout_tokens) == (4, held.num_tokens)
        assert domain.calibration_samples == 16 and domain.calibration_tokens > domain.heldout_tokens
        reference = report.source(domain.name)
        assert [layer.layer for layer in reference.layers] == [m.index for m in layout.moe_layers]
        for layer in reference.layers:  # the source against itself
            assert (layer.agreement, layer.exact_match, layer.kl) == (1.0, 1.0, 0.0)
            assert layer.tokens == domain.heldout_tokens and sum(layer.load) == pytest.approx(1.0)
        average = report.get("average", domain.name)
        assert average.mean_agreement < 1.0 and average.mean_kl > 0.0
        assert report.recovered(average) == 0.0
        assert report.recovered(reference) == pytest.approx(1.0)
    assert report.get("source0", "source0").mean_agreement == 1.0  # a source as candidate on its own domain

    markdown = (out / "report.md").read_text()
    headline = headline_table(report)
    assert markdown.index("## Headline") < markdown.index(headline) < markdown.index("## Setup")
    assert "| model | source0 loss | source0 agreement | source1 loss | source1 agreement |" in headline
    assert "![agreement_per_layer](agreement_per_layer.png)" in markdown
    assert len(report.warnings) == 1 and report.warnings[0].startswith("hybrid was calibrated with heldout=0")
    assert f"**Warning:** {report.warnings[0]}" in markdown


def test_oracle_swaps_exactly_the_routers(diagnosed: dict) -> None:
    report = load_report(diagnosed["out"])
    # the source's routers swapped into the source itself: the source, exactly
    reference = report.source("source0")
    oracle_of_source = report.get("source0 + oracle routers", "source0", "oracle")
    assert oracle_of_source.loss == pytest.approx(reference.loss, abs=1e-6)
    assert [(la.agreement, la.kl) for la in oracle_of_source.layers] == [(1.0, 0.0)] * len(reference.layers)
    # average + source0's routers on domain 0 = a checkpoint made of average's tensors and source0's routers
    oracle = report.get("average + oracle routers", "source0", "oracle")
    hybrid = report.get("hybrid", "source0")
    assert oracle.loss == pytest.approx(hybrid.loss, abs=1e-6)
    for a, b in zip(oracle.layers, hybrid.layers, strict=True):
        assert (a.agreement, a.exact_match, a.load) == (b.agreement, b.exact_match, b.load)
        assert a.kl == pytest.approx(b.kl, abs=1e-9)
    assert oracle.loss != report.get("average", "source0").loss  # the routers did change something
    # on domain 1 the oracle uses source1's routers, so the hybrid's source0 routers play no part
    assert report.get("hybrid + oracle routers", "source1", "oracle").loss == pytest.approx(
        report.get("average + oracle routers", "source1", "oracle").loss, abs=1e-6
    )


def test_loss_equals_transformers_forward_with_labels(diagnosed: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = load_report(diagnosed["out"])
    padded = 0
    for name, path in [("average", diagnosed["average"]), ("source0", diagnosed["sources"][0])]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        pad = AutoTokenizer.from_pretrained(path).pad_token_id
        for domain, source, files in zip(report.domains, diagnosed["sources"], diagnosed["data"], strict=True):
            held = heldout_text(Domain(str(source), (str(files),)), OPTIONS)
            total, count = 0.0, 0
            for batch in batches(held, OPTIONS.batch_tokens, pad):
                labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
                with torch.no_grad():
                    loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
                n = int((labels[:, 1:] != -100).sum())
                total, count = total + loss.item() * n, count + n
                padded += int((batch.attention_mask == 0).any())
            evaluation = report.get(name, domain.name)
            assert evaluation.predicted_tokens == count
            assert evaluation.loss == pytest.approx(total / count, abs=1e-5)
            assert evaluation.perplexity == pytest.approx(math.exp(total / count), rel=1e-4)
    assert padded > 0, "no held-out batch has padding: the test would not check that padding is excluded"


def test_report_carries_the_calibration_summaries(diagnosed: dict) -> None:
    """Per MoE layer, the numbers calibrate wrote (experts and HARC), in report.json and as report.md rows."""
    report = load_report(diagnosed["out"])
    assert list(report.calibrations) == ["hybrid", "calibrated"]  # average and source0 have no summary file
    assert Report.from_dict(report.to_dict()).calibrations == report.calibrations
    calibrated = diagnosed["calibrated"]
    summary = json.loads((calibrated / SUMMARY_FILE).read_text())
    record = report.calibrations["calibrated"]
    assert record.file == str(calibrated / SUMMARY_FILE)
    moe = load_layout(calibrated).moe_layers
    assert [layer.layer for layer in record.layers] == [info.index for info in moe]
    markdown = (diagnosed["out"] / "report.md").read_text()
    sources = [str(s) for s in diagnosed["sources"]]
    kept = 0
    for layer, info, harc in zip(record.layers, moe, summary["layers"], strict=True):
        written = summary["regmean"]["layers"][str(info.index)]["experts"]
        experts = layer.experts
        assert (experts.calibrated, experts.kept_stage1, experts.fallbacks) == (
            written["calibrated"],
            written["kept_stage1"],
            written["fallbacks"],
        )
        assert experts.calibrated + experts.kept_stage1 == info.num_experts
        kept += experts.kept_stage1
        assert (layer.harc.iterations, layer.harc.converged) == (harc["iterations"], harc["converged"])
        cells = [str(info.index), str(written["calibrated"]), str(written["kept_stage1"]), str(written["fallbacks"])]
        for source, domain in zip(sources, report.domains, strict=True):
            counts = written["tokens"][source]
            assert vars(experts.tokens[source]) == counts
            # top-k membership: every calibration token of the domain counts once for each of its k experts
            routed = harc["domains"][source]["tokens"]
            assert counts["total"] == info.top_k * domain.calibration_tokens == info.top_k * routed
            cells += [str(counts["total"]), f"{counts['min']} / {counts['median']:g} / {counts['max']}"]
        cells += [str(harc["iterations"]), "yes" if harc["converged"] else "**no**"]
        assert "| " + " | ".join(cells) + " |" in markdown
    assert 0 < kept < sum(info.num_experts for info in moe), "min_tokens should keep some experts, not all"

    section = markdown[markdown.index("### Calibration of calibrated") :]
    assert section.startswith(f"### Calibration of calibrated\n\nFrom `{calibrated / SUMMARY_FILE}`; min_tokens 400.")
    per_source = [f"{d} tokens | {d} tokens per expert (min / median / max)" for d in ("source0", "source1")]
    header = " | ".join(["| layer | experts calibrated | kept stage 1 | fallbacks", *per_source, "HARC iterations"])
    assert f"{header} | converged |\n" in section
    # routers only: HARC columns alone; no summary file: no section
    hybrid = markdown[markdown.index("### Calibration of hybrid") : markdown.index("### Calibration of calibrated")]
    rows = [f"| {info.index} | {5 + info.index} | {'**no**' if info.index == 1 else 'yes'} |" for info in moe]
    assert "| layer | HARC iterations | converged |\n|---|---:|---:|\n" + "\n".join(rows) in hybrid
    assert "### Calibration of average" not in markdown and "### Calibration of source0" not in markdown


def test_experts_only_summary_has_no_harc_columns(diagnosed: dict) -> None:
    """routers: false (stage-1 merge_method: regmean): no HARC layers; dense layers (linear_layers: all) skipped."""
    summary = json.loads((diagnosed["calibrated"] / SUMMARY_FILE).read_text())
    summary["layers"] = []
    summary["regmean"]["layers"]["7"] = {"linears": {"calibrated": 4, "fallbacks": 0}}
    record = Calibration.from_summary(summary, "summary.json")
    written = summary["regmean"]["layers"]
    assert [(layer.layer, layer.harc) for layer in record.layers] == [(int(i), None) for i in written if i != "7"]
    assert [layer.experts.kept_stage1 for layer in record.layers] == [
        layer["experts"]["kept_stage1"] for i, layer in written.items() if i != "7"
    ]
    table = calibration_table(load_report(diagnosed["out"]), record)
    assert "HARC" not in table and "converged" not in table and table.count("\n") == 1 + len(record.layers)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"layers": [', "Expecting value"),
        ("{}", "layers: missing"),
        ('{"layers": [{"layer": 0, "iterations": 3}]}', "layers[0].converged: missing"),
        ('{"layers": [{"layer": 0, "iterations": true, "converged": true}]}', "layers[0].iterations: expected int"),
        ('{"layers": [], "regmean": {"layers": {"1": {"experts": {"calibrated": 4}}}}}', "regmean.layers.1.experts."),
    ],
)
def test_unreadable_calibration_summary_is_an_error_naming_it(tmp_path: Path, text: str, problem: str) -> None:
    model = tmp_path / "calibrated"
    model.mkdir()
    (model / SUMMARY_FILE).write_text(text)
    with pytest.raises(ValueError, match="not a readable moemerge calibration summary") as raised:
        evaluate([str(model)], [Domain(str(tmp_path / "source"), ("unused.jsonl",))], OPTIONS, progress=False)
    assert str(raised.value).startswith(f"{model / SUMMARY_FILE}: ") and problem in str(raised.value)


def test_existing_report_folder_is_an_error(diagnosed: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(diagnosed["argv"]) == 1
    assert "report folder exists" in capsys.readouterr().err


def test_heldout_must_be_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    argv = ["diagnose", "--model", "m", "--source", "s", "--data", f"s={data}", "-o", str(tmp_path / "r")]
    assert main(argv) == 1
    assert "--heldout" in capsys.readouterr().err


def test_oracle_for_limits_oracle_rows_and_equals_the_full_run(diagnosed: dict, tmp_path: Path) -> None:
    """`--oracle-for` (repeatable, a path or a report name) gives oracle rows to those candidates only, with the
    numbers of the run that evaluated every candidate's oracle; an unknown candidate is refused before any work."""
    full = load_report(diagnosed["out"])
    argv = [a if a != str(diagnosed["out"]) else str(tmp_path / "some") for a in diagnosed["argv"]]
    argv += ["--oracle-for", str(diagnosed["hybrid"]), "--oracle-for", "average"]
    assert main(argv) == 0
    some = load_report(tmp_path / "some")
    assert [m for m, role in some.rows() if role == "oracle"] == ["average + oracle routers", "hybrid + oracle routers"]
    for model, role in some.rows():
        for domain in (d.name for d in some.domains):
            assert some.get(model, domain, role).loss == full.get(model, domain, role).loss
    bad = [a if a != str(diagnosed["out"]) else str(tmp_path / "bad") for a in diagnosed["argv"]]
    assert main([*bad, "--oracle-for", "nobody"]) == 1
    assert not (tmp_path / "bad").exists()
