"""NaN and Inf stop every stage with a one-line error naming the model folder (or layer) and tensor; nothing is written.

Cases: a NaN, +Inf or -Inf in a source, the base, or a router copied from the base (stage 1, per
method, linear and TIES: TIES's masks could hide a NaN from the output); float16 overflow of a
merged tensor whose inputs are finite (and the same recipe in bfloat16 passing); NaN hidden states
in the calibration walk; an Inf in a source router that HARC reads; solved experts that overflow the
checkpoint's float16; a solved router that is not finite. Plus the check itself against
`torch.isfinite` on every float dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_specialists

from moemerge.checkpoint.reader import CheckpointReader
from moemerge.checkpoint.writer import CheckpointWriter
from moemerge.cli import main
from moemerge.finite import NonFiniteError, check_cast, check_finite, is_finite

nan = float("nan")
ROUTER = "model.layers.1.mlp.gate.weight"
EXPERT = "model.layers.2.mlp.experts.1.down_proj.weight"
EMBEDDING = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_specialists("olmoe", tmp_path_factory.mktemp("nonfinite"))


def edited_copy(model: Path, out: Path, edit: Callable[[str, torch.Tensor], torch.Tensor]) -> Path:
    """`model` with every tensor passed through `edit(name, tensor)`."""
    with CheckpointReader(model) as reader, CheckpointWriter(out, overwrite=True) as writer:
        for name in reader.names():
            writer.add(name, edit(name, reader.read(name).clone()))
        writer.copy_support_files(model)
        writer.finalize()
    return out


def poke(target: str, value: float, index: int = 7) -> Callable[[str, torch.Tensor], torch.Tensor]:
    def edit(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name == target:
            tensor.view(-1)[index] = value
        return tensor

    return edit


@pytest.fixture
def moemerge(capsys: pytest.CaptureFixture) -> Callable[..., tuple[int, str]]:
    """The CLI in this process: (exit status, stderr)."""

    def run(*args: str) -> tuple[int, str]:
        status = main(list(args))
        return status, capsys.readouterr().err

    return run


def error_line(result: tuple[int, str]) -> str:
    """The one error line (progress bars aside)."""
    status, stderr = result
    assert status == 1, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("moemerge: error:")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def assert_nothing_written(folder: Path, out_name: str) -> None:
    assert not (folder / out_name).exists()
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{out_name}."))
    assert not leftovers, leftovers


def merge_recipe(base: Path, sources: list[Path], method: str = "linear", **extra) -> dict:
    parameters = {"weight": 0.5} | ({"density": 0.7} if method == "ties" else {})
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(s), "parameters": parameters} for s in sources],
        "dtype": "float32",
        **extra,
    }


def run_merge(moemerge: Callable, tmp_path: Path, recipe: dict) -> tuple[int, str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return moemerge("merge", str(path), "-o", str(tmp_path / "out"), "--quiet")


# ---------------------------------------------------------------------------------------------
# stage 1


@pytest.mark.parametrize(
    ("which", "tensor", "value", "method"),
    [
        ("source1", ROUTER, float("nan"), "linear"),
        ("source1", ROUTER, float("nan"), "ties"),
        ("source0", EXPERT, float("inf"), "ties"),
        ("base", EMBEDDING, -float("inf"), "task_arithmetic"),
    ],
)
def test_non_finite_source_tensor_stops_stage1(setup, tmp_path, moemerge, which, tensor, value, method) -> None:
    models = {"base": setup["base"], "source0": setup["sources"][0], "source1": setup["sources"][1]}
    models[which] = edited_copy(models[which], tmp_path / f"bad_{which}", poke(tensor, value))
    recipe = merge_recipe(models["base"], [models["source0"], models["source1"]], method)
    line = error_line(run_merge(moemerge, tmp_path, recipe))
    assert f"{models[which]}: tensor {tensor} has non-finite values" in line, line
    assert ("1 NaN" if value != value else "1 Inf") in line, line
    assert_nothing_written(tmp_path, "out")


def test_nan_in_a_router_copied_from_the_base(setup, tmp_path, moemerge) -> None:
    base = edited_copy(setup["base"], tmp_path / "bad_base", poke(ROUTER, float("nan")))
    recipe = merge_recipe(base, setup["sources"], routers="base")
    line = error_line(run_merge(moemerge, tmp_path, recipe))
    assert f"{base}: tensor {ROUTER} has non-finite values" in line, line
    assert_nothing_written(tmp_path, "out")


def test_float16_overflow_of_a_merged_tensor_is_named(setup, tmp_path, moemerge) -> None:
    """Finite float32 inputs whose merge exceeds 65504: float16 refuses it, bfloat16 holds it."""

    def big(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * 1e7 if name == EXPERT else tensor

    sources = [edited_copy(s, tmp_path / f"big{k}", big) for k, s in enumerate(setup["sources"])]
    base = edited_copy(setup["base"], tmp_path / "bigbase", big)
    recipe = merge_recipe(base, sources, "task_arithmetic", dtype="float16")
    line = error_line(run_merge(moemerge, tmp_path, recipe))
    assert f"merged tensor {EXPERT}" in line and "overflows float16" in line and "exceeds 65504" in line, line
    assert_nothing_written(tmp_path, "out")

    status, stderr = run_merge(moemerge, tmp_path, recipe | {"dtype": "bfloat16"})
    assert status == 0, stderr[-2000:]
    with CheckpointReader(tmp_path / "out") as reader:
        assert all(is_finite(reader.read(name)) for name in reader.names())


# ---------------------------------------------------------------------------------------------
# stage 2


def calibrate_args(merged: Path, sources: list[Path], data: list[Path], out: Path) -> list[str]:
    args = ["calibrate", "--merged", str(merged), "-o", str(out), "--max-length", "48", "--batch-tokens", "256"]
    for source, text in zip(sources, data, strict=True):
        args += ["--source", str(source), "--data", f"{source}={text}"]
    return args


def test_nan_hidden_states_stop_the_walk_naming_the_layer(setup, tmp_path, moemerge) -> None:
    merged = edited_copy(setup["average"], tmp_path / "merged", poke("model.layers.1.self_attn.q_proj.weight", nan))
    line = error_line(moemerge(*calibrate_args(merged, setup["sources"], setup["data"], tmp_path / "out")))
    assert f"layer 1: hidden states of {setup['sources'][0]}'s calibration text has non-finite values" in line, line
    assert_nothing_written(tmp_path, "out")


def test_inf_in_a_source_router_stops_harc(setup, tmp_path, moemerge) -> None:
    source = edited_copy(setup["sources"][1], tmp_path / "bad_source", poke(ROUTER, float("inf")))
    sources = [setup["sources"][0], source]
    line = error_line(moemerge(*calibrate_args(setup["average"], sources, setup["data"], tmp_path / "out")))
    assert f"{source}: router tensor {ROUTER} has non-finite values" in line, line
    assert_nothing_written(tmp_path, "out")


def test_solved_experts_that_overflow_float16_are_refused(setup, tmp_path, moemerge) -> None:
    """Merged model stored in float16, a source's expert a million times larger: RegMean's solution does not fit."""
    merged = edited_copy(setup["average"], tmp_path / "merged16", lambda _, t: t.half() if t.is_floating_point() else t)
    layer0_expert = "model.layers.0.mlp.experts.1."
    source = edited_copy(
        setup["sources"][1], tmp_path / "big_source", lambda n, t: t * 1e6 if n.startswith(layer0_expert) else t
    )
    args = calibrate_args(merged, [setup["sources"][0], source], setup["data"], tmp_path / "out")
    line = error_line(moemerge(*args, "--experts"))
    assert "layer 0: solved model.layers.0.mlp.experts." in line and "Inf" in line, line
    assert_nothing_written(tmp_path, "out")


def test_a_non_finite_solved_router_is_refused(setup, tmp_path, monkeypatch) -> None:
    """HARC's solve does not produce NaN from finite inputs; a solver that did is caught before the work folder."""
    from moemerge.calibrate import runner
    from moemerge.calibrate.options import CalibrationOptions
    from moemerge.data import DataOptions

    solve = runner.solve_router

    def broken(*args, **kwargs):
        solution = solve(*args, **kwargs)
        solution.weight[0, 0] = float("nan")
        return solution

    monkeypatch.setattr(runner, "solve_router", broken)
    domains = [runner.Domain(str(s), (str(d),)) for s, d in zip(setup["sources"], setup["data"], strict=True)]
    options = CalibrationOptions(data=DataOptions(max_length=48), batch_tokens=256)
    with pytest.raises(NonFiniteError, match=r"layer 0: solved router model.layers.0.mlp.gate.weight has non-finite"):
        runner.calibrate(str(setup["average"]), domains, tmp_path / "out", options, progress=False)
    assert_nothing_written(tmp_path, "out")
    assert not list((tmp_path / "out.work").glob("layer_*.safetensors"))


# ---------------------------------------------------------------------------------------------
# the check itself


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_is_finite_agrees_with_isfinite(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        shape = [int(n) for n in torch.randint(1, 40, (1 + trial % 3,), generator=generator)]
        tensor = (torch.randn(shape, generator=generator) * 10 ** float(torch.randint(-3, 4, (1,)))).to(dtype)
        if trial % 4:  # three in four get some non-finite values, at random places
            bad = torch.rand(shape, generator=generator) < 0.02
            values = torch.tensor([float("nan"), float("inf"), -float("inf")])[trial % 3]
            tensor[bad] = values.to(dtype)
        view = tensor.transpose(0, -1) if tensor.dim() > 1 else tensor  # non-contiguous too
        assert is_finite(view) == bool(torch.isfinite(view).all()), (trial, dtype)


def test_messages_count_what_is_wrong_and_name_overflow() -> None:
    tensor = torch.zeros(3, 4)
    tensor[1, 2], tensor[2, 0] = float("nan"), float("inf")
    with pytest.raises(
        NonFiniteError,
        match=r"^m: tensor t has non-finite values \(1 NaN and 1 Inf of 12 values, the first at index \(1, 2\)\)$",
    ):
        check_finite(tensor, "m: tensor t")
    check_finite(torch.arange(5), "integers are always finite")
    value = torch.tensor([1.0, -70000.0])
    with pytest.raises(NonFiniteError, match="overflows float16: its largest magnitude 70000 exceeds 65504"):
        check_cast(value, value.half(), "merged tensor t")
    check_cast(value, value.bfloat16(), "bfloat16 holds it")


def test_methods_that_spread_non_finite_values_really_do() -> None:
    """For a method flagged `spreads_non_finite` the driver checks the output alone: any NaN or Inf in any input
    it takes, with any weights (zero and negative included), must reach the output."""
    from moemerge.merge.registry import TensorContext, get_method, method_names

    flagged = [get_method(name) for name in method_names() if get_method(name).spreads_non_finite]
    assert {m.name for m in flagged} >= {"linear", "task_arithmetic"}
    generator = torch.Generator().manual_seed(3)
    for method in flagged:
        for trial in range(40):
            inputs = [torch.randn(5, 7, generator=generator) for _ in range(4)]  # base + 3 sources
            bad = int(torch.randint(0 if method.needs_base else 1, 4, (1,), generator=generator))
            position = int(torch.randint(0, 35, (1,), generator=generator))
            inputs[bad].view(-1)[position] = [float("nan"), float("inf"), -float("inf")][trial % 3]
            weights = [
                float(w) for w in torch.tensor([0.0, -0.5, 1.0, 2.0])[torch.randint(0, 4, (3,), generator=generator)]
            ]
            if sum(weights) == 0:
                weights[0] = 1.0
            params, per_source = method.parse_params({}, [{"weight": w} for w in weights])
            base = inputs[0] if method.needs_base else None
            out = method(base, inputs[1:], per_source, params, TensorContext("t"))
            assert not is_finite(out), (method.name, trial, bad, weights)
