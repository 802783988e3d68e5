"""The HARC runner: what it records equals the full model's router inputs; it repairs routing; it resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_specialists

from moemerge.architectures.layout import load_layout
from moemerge.architectures.records import FAMILIES
from moemerge.calibrate.runner import SUMMARY_FILE, CalibrationOptions, Calibrator, Domain, calibrate
from moemerge.checkpoint.reader import CheckpointReader
from moemerge.data import DataOptions, batches, load_domain

FAST = CalibrationOptions(data=DataOptions(max_length=48), batch_tokens=256)


def _domains(setup: dict) -> list[Domain]:
    return [Domain(str(s), (str(f),)) for s, f in zip(setup["sources"], setup["data"], strict=True)]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_recorded_router_inputs_equal_full_model_forward(model_type: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    setup = make_specialists(model_type, tmp_path)
    calibrator = Calibrator(str(setup["average"]), _domains(setup), FAST, tmp_path / "work")
    recorded: dict[int, list[torch.Tensor]] = {}
    calibrator.run(progress=False, on_router_inputs=lambda i, xs: recorded.__setitem__(i, xs))
    out = calibrator.write(tmp_path / "out", overwrite=False)

    layout = load_layout(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    captured: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layout.moe_layers}
    for layer in layout.moe_layers:
        router = model.get_submodule(layer.router_module)
        router.register_forward_pre_hook(
            lambda m, args, kw, i=layer.index: captured[i].append(args[0] if args else kw["hidden_states"]),
            with_kwargs=True,
        )
    assert set(recorded) == set(captured)
    padded_batches = 0
    for d, (source, files) in enumerate((d.source, d.files) for d in _domains(setup)):
        domain, _ = load_domain(source, files, tokenizer, FAST.data)
        full_inputs: dict[int, list[torch.Tensor]] = {}
        for batch in batches(domain, FAST.batch_tokens, tokenizer.pad_token_id):
            padded_batches += int((batch.attention_mask == 0).any())
            for xs in captured.values():
                xs.clear()
            with torch.no_grad():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            real = batch.attention_mask.reshape(-1).bool()
            for index, xs in captured.items():
                full_inputs.setdefault(index, []).append(xs[-1].reshape(-1, xs[-1].shape[-1])[real])
        for layer in layout.moe_layers:
            full = torch.cat(full_inputs.pop(layer.index))
            assert torch.allclose(recorded[layer.index][d].float(), full, atol=1e-5, rtol=1e-4), layer.index
    assert padded_batches > 0


@pytest.mark.parametrize("model_type", ["olmoe", "deepseek_v3"])
def test_calibration_raises_routing_agreement(model_type: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    setup = make_specialists(model_type, tmp_path)
    out = calibrate(str(setup["average"]), _domains(setup), tmp_path / "out", FAST, progress=False)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    before = [d["agreement_before"] for layer in summary["layers"] for d in layer["domains"].values()]
    after = [d["agreement_after"] for layer in summary["layers"] for d in layer["domains"].values()]
    assert sum(after) / len(after) > sum(before) / len(before)
    assert all(layer["converged"] for layer in summary["layers"])
    merged, calibrated = CheckpointReader(setup["average"]), CheckpointReader(out)
    routers = load_layout(out).router_tensors
    for name in merged.names():
        same = torch.equal(merged.read(name), calibrated.read(name))
        assert same != (name in routers), name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.randint(3, 90, (1, 8))).logits).all()


def _calibrate_command(setup: dict, out: Path) -> list[str]:
    command = [sys.executable, "-m", "moemerge", "calibrate", "--merged", str(setup["average"]), "-o", str(out)]
    for source, data in zip(setup["sources"], setup["data"], strict=True):
        command += ["--source", str(source), "--data", f"{source}={data}"]
    return command + ["--max-length", "64", "--batch-tokens", "256", "--preconditioner", "none", "--dtype", "float64"]


def test_killed_run_resumes_bit_identical(tmp_path: Path) -> None:
    setup = make_specialists("olmoe", tmp_path, num_hidden_layers=4)
    reference = tmp_path / "reference"
    subprocess.run(_calibrate_command(setup, reference), check=True, capture_output=True)

    out = tmp_path / "resumed"
    process = subprocess.Popen(_calibrate_command(setup, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second_layer = tmp_path / "resumed.work" / "layer_0001.safetensors"
    while not second_layer.exists() and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists(), "the run finished before it could be killed; the test needs slower layers"
    finished = sorted(p.name for p in (tmp_path / "resumed.work").glob("layer_*.safetensors"))
    assert "layer_0001.safetensors" in finished and "layer_0003.safetensors" not in finished

    subprocess.run(_calibrate_command(setup, out), check=True, capture_output=True)
    for shard in reference.glob("*.safetensors"):
        assert shard.read_bytes() == (out / shard.name).read_bytes()
