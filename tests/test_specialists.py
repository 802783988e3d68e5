"""examples/specialists scaled down to seconds: pretrain, ESFT specialists, merge, HARC, diagnose with oracle routers.

The same functions as build.py (training loop, expert load, ESFT freezing) on a 2-layer OLMoE with
the character tokenizer and two real domains (stdlib source code, pydoc prose).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _build_module():
    spec = importlib.util.spec_from_file_location("specialists_build", ROOT / "examples" / "specialists" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.SEQ_LEN, module.BATCH = 48, 8
    return module


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import inspect
    import json as json_module
    import pydoc_data.topics

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moemerge.architectures.tiny import tiny_tokenizer
    from moemerge.calibrate.options import CalibrationOptions
    from moemerge.calibrate.runner import Domain, calibrate
    from moemerge.data import DataOptions
    from moemerge.diagnose.evaluate import diagnose
    from moemerge.diagnose.options import DiagnoseOptions
    from moemerge.pipeline.stage1 import merge_checkpoints

    build = _build_module()
    root = tmp_path_factory.mktemp("specialists")
    tokenizer = tiny_tokenizer()
    texts = {
        "code": build._chunks(inspect.getsource(json_module.decoder) + inspect.getsource(json_module.encoder), 300),
        "prose": build._chunks(
            "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:40]), 300
        ),
    }
    train = {d: t[24:] for d, t in texts.items()}
    streams = {
        d: torch.tensor([i for s in t for i in tokenizer(s, add_special_tokens=False)["input_ids"] + [2]])
        for d, t in train.items()
    }
    files = {}
    for d, t in texts.items():  # the first 24 samples: calibration and held-out text, never trained on
        files[d] = root / f"{d}.jsonl"
        files[d].write_text("".join(json.dumps({"text": s}) + "\n" for s in t[:24]))

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "olmoe",
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        vocab_size=len(tokenizer),
        num_experts=8,
        num_experts_per_tok=1,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    build.train(model, streams, tuple(streams), 40, 1e-2, 0, "test base")
    build._save(model, tokenizer, root / "base")
    sources = []
    for k, d in enumerate(texts):
        specialist = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        setup = build.esft_setup(specialist, build.expert_load(specialist, streams[d], tokens=2048))
        build.train(specialist, streams, (d,), 40, 1e-2, 1 + k, f"test {d}", setup["masks"])
        build._save(specialist, tokenizer, root / d)
        sources.append(str(root / d))

    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(root / "base"),
        "models": [{"model": s, "parameters": {"weight": 1.0}} for s in sources],
        "dtype": "float32",
    }
    (root / "recipe.yaml").write_text(json.dumps(recipe))
    stage1 = merge_checkpoints(root / "recipe.yaml", root / "stage1", progress=False)
    domains = [Domain(s, (str(files[d]),)) for s, d in zip(sources, texts, strict=True)]
    data = DataOptions(heldout=12, max_length=64, seed=0)
    calibrated = calibrate(str(stage1), domains, root / "harc", CalibrationOptions(data=data), progress=False)
    options = DiagnoseOptions(data=data, stage1=str(stage1), oracle_routers=True)
    report = diagnose([str(stage1), str(calibrated)], domains, root / "report", options, progress=False)
    return {
        "root": root,
        "base": root / "base",
        "sources": sources,
        "stage1": stage1,
        "harc": calibrated,
        "domains": domains,
        "data": data,
        "report": report,
        "names": list(texts),
    }


def test_specialists_differ_from_the_base(pipeline: dict) -> None:
    from moemerge.architectures.layout import load_layout
    from moemerge.checkpoint.reader import CheckpointReader

    layout = load_layout(pipeline["base"])
    base = CheckpointReader(pipeline["base"])
    for source in pipeline["sources"]:
        reader = CheckpointReader(source)
        for name in layout.router_tensors:
            assert not reader.read(name).equal(base.read(name)), f"{source}: router {name} was not trained"
        changed = [n for n in reader.names() if not reader.read(n).equal(base.read(n))]
        frozen = [n for n in reader.names() if "embed" in n or "self_attn" in n or "norm" in n]
        assert frozen and not set(frozen) & set(changed), "ESFT trained a frozen tensor"


def test_stage1_routes_unlike_each_specialist_and_harc_repairs_it(pipeline: dict) -> None:
    report = pipeline["report"]
    stage1, harc = (model for model, role in report.rows() if role == "candidate")
    for domain in pipeline["names"]:
        assert report.get(stage1, domain).mean_agreement < 0.95, domain
    before = sum(report.get(stage1, d).mean_agreement for d in pipeline["names"])
    after = sum(report.get(harc, d).mean_agreement for d in pipeline["names"])
    assert after > before + 0.02, (before, after)


def test_oracle_rows_swap_exactly_the_routers(pipeline: dict, tmp_path: Path) -> None:
    """The oracle row equals a hand-built checkpoint: stage 1 with the source's router tensors, nothing else."""
    from moemerge.architectures.layout import load_layout
    from moemerge.checkpoint.reader import CheckpointReader
    from moemerge.checkpoint.writer import CheckpointWriter
    from moemerge.diagnose.evaluate import diagnose
    from moemerge.diagnose.options import DiagnoseOptions
    from moemerge.diagnose.report import ORACLE_SUFFIX

    report = pipeline["report"]
    stage1_name, harc_name = (model for model, role in report.rows() if role == "candidate")
    layout = load_layout(pipeline["stage1"])
    stage1 = CheckpointReader(pipeline["stage1"])
    source_index = 0
    source = CheckpointReader(pipeline["sources"][source_index])
    swapped = tmp_path / "swapped"
    with CheckpointWriter(swapped) as writer:
        for name in stage1.names():
            writer.add(name, source.read(name) if name in layout.router_tensors else stage1.read(name))
        writer.copy_support_files(pipeline["stage1"])
        writer.finalize()
    domain = pipeline["domains"][source_index]
    options = DiagnoseOptions(data=pipeline["data"])
    by_hand = diagnose([str(swapped)], [domain], tmp_path / "report", options, progress=False)
    name = pipeline["names"][source_index]
    oracle = report.get(stage1_name + ORACLE_SUFFIX, name, "oracle")
    manual = by_hand.get(by_hand.rows()[0][0], name)
    assert oracle.loss == pytest.approx(manual.loss, abs=1e-6)
    assert oracle.mean_agreement == pytest.approx(manual.mean_agreement, abs=1e-9)
    # HARC changes only routers, so its oracle row is the stage-1 oracle row
    harc_oracle = report.get(harc_name + ORACLE_SUFFIX, name, "oracle")
    assert harc_oracle.loss == pytest.approx(oracle.loss, abs=1e-6)
