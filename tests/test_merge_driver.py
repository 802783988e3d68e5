"""The streaming stage-1 driver end to end, through the CLI, on a tiny OLMoE and noisy fine-tunes of it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from moemerge.checkpoint.reader import CheckpointReader
from moemerge.checkpoint.writer import CheckpointWriter
from moemerge.cli import main
from moemerge.merge.plan import plan_merge
from moemerge.merge.recipe import MergeRecipe
from moemerge.merge.registry import TensorContext, get_method, method_names
from moemerge.merge.tensors import merge_tensor

NOISE = 0.02


def noisy_copy(base: Path, out: Path, seed: int, edit=None) -> Path:
    """A 'fine-tune' of `base`: Gaussian noise on every float tensor; `edit(tensors)` may then break it."""
    gen = torch.Generator().manual_seed(seed)
    with CheckpointReader(base) as reader:
        tensors = {}
        for name in reader.names():
            t = reader.read(name)
            if t.is_floating_point():
                t = t + NOISE * torch.randn(t.shape, generator=gen, dtype=t.dtype)
            tensors[name] = t
    if edit is not None:
        edit(tensors)
    with CheckpointWriter(out) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
        writer.copy_support_files(base)
        writer.finalize()
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from moemerge.architectures.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("driver")
    base = save_tiny_model("olmoe", root / "base", seed=1)
    return {"base": base, **{f"s{i}": noisy_copy(base, root / f"s{i}", seed=10 + i) for i in range(3)}}


def run_merge(tmp_path: Path, recipe: dict, out_name: str = "out", extra: tuple[str, ...] = ()) -> tuple[int, Path]:
    path = tmp_path / f"{out_name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / out_name
    return main(["merge", str(path), "-o", str(out), "--quiet", *extra]), out


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(model_dir) as reader:
        return {name: reader.read(name) for name in reader.names()}


def params_for(method_name: str) -> tuple[dict, list[dict]]:
    """Small valid parameters for any registered method, chosen from the fields it declares."""
    method = get_method(method_name)
    per_source_fields = {f.alias or n for n, f in method.source_params_model.model_fields.items()}
    method_fields = {f.alias or n for n, f in method.params_model.model_fields.items()}
    per_source = []
    for weight, density in [(0.5, 0.6), (0.8, 0.5), (0.3, 0.7)]:
        values = {"weight": weight, "density": density, "epsilon": 0.1, "gamma": 0.05}
        per_source.append({k: v for k, v in values.items() if k in per_source_fields})
    shared = {"steps": 5, "lr": 1e-4} if "steps" in method_fields else {}
    return shared, per_source


def recipe_for(models: dict[str, Path], method: str, shared: dict, per_source: list[dict], **extra) -> dict:
    return {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models[f"s{i}"]), "parameters": p} for i, p in enumerate(per_source)],
        "parameters": shared,
        "dtype": "float32",
        **extra,
    }


@pytest.mark.parametrize("method", method_names())
def test_every_method_writes_a_loadable_model_with_the_base_layout(models, tmp_path, method):
    from transformers import AutoModelForCausalLM

    rc, out = run_merge(tmp_path, recipe_for(models, method, *params_for(method)))
    assert rc == 0
    with CheckpointReader(models["base"]) as base, CheckpointReader(out) as merged:
        assert merged.names() == base.names()
        for name in base.names():
            assert merged.info(name).shape == base.info(name).shape, name
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 9, 17, 33]])).logits
    assert logits.shape == (1, 5, 128) and torch.isfinite(logits).all()
    assert f"`{method}`" in (out / "README.md").read_text()


def test_linear_matches_float64_weighted_average(models, tmp_path):
    weights = [0.6, -0.3, 1.2]
    rc, out = run_merge(tmp_path, recipe_for(models, "linear", {}, [{"weight": w} for w in weights]))
    assert rc == 0
    merged, srcs = tensors(out), [tensors(models[f"s{i}"]) for i in range(3)]
    for name, got in merged.items():
        want = sum(w * s[name].double() for w, s in zip(weights, srcs, strict=True)) / sum(weights)
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6, msg=name)


def test_task_arithmetic_matches_float64_task_vectors(models, tmp_path):
    weights, lam = [0.5, 0.8, -0.4], 0.7
    per = [{"weight": w} for w in weights]
    rc, out = run_merge(tmp_path, recipe_for(models, "task_arithmetic", {"lambda": lam}, per))
    assert rc == 0
    merged, base = tensors(out), tensors(models["base"])
    srcs = [tensors(models[f"s{i}"]) for i in range(3)]
    for name, got in merged.items():
        b = base[name].double()
        want = b + lam * sum(w * (s[name].double() - b) for w, s in zip(weights, srcs, strict=True))
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6, msg=name)


def test_filtered_parameters_apply_to_matching_tensors_only(models, tmp_path):
    experts_only = [{"filter": "mlp.experts", "value": 1.0}, {"value": 0.0}]
    all_but_experts = [{"filter": "mlp.experts", "value": 0.0}, {"value": 1.0}]
    recipe = recipe_for(models, "linear", {}, [{"weight": experts_only}, {"weight": all_but_experts}])
    recipe["parameters"] = {"normalize": False}
    rc, out = run_merge(tmp_path, recipe)
    assert rc == 0
    merged, s0, s1 = tensors(out), tensors(models["s0"]), tensors(models["s1"])
    assert any("mlp.experts" in n for n in merged) and any("mlp.experts" not in n for n in merged)
    for name, got in merged.items():
        assert torch.equal(got, s0[name] if "mlp.experts" in name else s1[name]), name

    # a method-wide filtered value: lambda 0 on attention keeps the base there, 1 elsewhere
    per = [{"weight": 1.0}] * 2
    lam = [{"filter": "self_attn", "value": 0.0}, {"value": 1.0}]
    recipe = recipe_for(models, "task_arithmetic", {"lambda": lam}, per)
    rc, out = run_merge(tmp_path, recipe, "out_lambda")
    assert rc == 0
    merged, base = tensors(out), tensors(models["base"])
    for name, got in merged.items():
        assert torch.equal(got, base[name]) == ("self_attn" in name), name


@pytest.mark.parametrize("routers", ["base", "s1"])
def test_routers_copied_exactly_from_base_or_a_source(models, tmp_path, routers):
    from moemerge.architectures.layout import load_layout

    router_names = load_layout(models["base"]).router_tensors
    assert router_names
    source = "base" if routers == "base" else str(models[routers])
    rc, out = run_merge(tmp_path, recipe_for(models, "ties", *params_for("ties"), routers=source))
    assert rc == 0
    merged = tensors(out)
    copied = tensors(models["base" if routers == "base" else routers])
    for name, got in merged.items():
        assert torch.equal(got, copied[name]) == (name in router_names), name


def test_selection_biases_are_merged_not_dropped(tmp_path):
    from moemerge.architectures.layout import load_layout
    from moemerge.architectures.tiny import tiny_model

    base = tmp_path / "dsv3"
    tiny_model("deepseek_v3", seed=3).save_pretrained(base)
    models = {"base": base, "s0": noisy_copy(base, tmp_path / "d0", 1), "s1": noisy_copy(base, tmp_path / "d1", 2)}
    biases = load_layout(base).selection_biases
    assert biases
    rc, out = run_merge(tmp_path, recipe_for(models, "linear", {}, [{"weight": 1.0}, {"weight": 3.0}]))
    assert rc == 0
    merged, s0, s1 = tensors(out), tensors(models["s0"]), tensors(models["s1"])
    for name in biases:
        torch.testing.assert_close(merged[name], (s0[name] + 3 * s1[name]) / 4, msg=name)


def _drop_tensor(t: dict) -> None:
    del t["model.layers.1.self_attn.q_proj.weight"]


def _reshape_tensor(t: dict) -> None:
    t["model.layers.2.mlp.experts.0.up_proj.weight"] = torch.randn(40, 32)


def _olmoe_with(**overrides):
    def make(path: Path) -> Path:
        from moemerge.architectures.tiny import tiny_model

        tiny_model("olmoe", seed=5, **overrides).save_pretrained(path)
        return path

    return make


@pytest.mark.parametrize(
    "make_bad, named",
    [
        (lambda base, path: noisy_copy(base, path, 7, _drop_tensor), "model.layers.1.self_attn.q_proj.weight"),
        (lambda base, path: noisy_copy(base, path, 7, _reshape_tensor), "model.layers.2.mlp.experts.0.up_proj.weight"),
        (lambda base, path: _olmoe_with(num_experts=8)(path), "num_experts"),
        (lambda base, path: _olmoe_with(hidden_size=64)(path), "hidden_size"),
    ],
    ids=["missing-tensor", "wrong-shape", "num-experts", "hidden-size"],
)
def test_incompatible_source_exits_1_naming_it_and_writes_nothing(models, tmp_path, capsys, make_bad, named):
    bad = make_bad(models["base"], tmp_path / "bad")
    recipe = recipe_for({**models, "s1": bad}, "task_arithmetic", {}, [{"weight": 1.0}] * 2)
    capsys.readouterr()
    rc, out = run_merge(tmp_path, recipe)
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert len(err.splitlines()) == 1, err
    assert named in err and str(bad) in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(f".{out.name}*")), "temporary folder left behind"


def test_existing_output_needs_overwrite(models, tmp_path, capsys):
    recipe = recipe_for(models, "linear", {}, [{"weight": 1.0}] * 2)
    assert run_merge(tmp_path, recipe)[0] == 0
    rc, out = run_merge(tmp_path, recipe)
    assert rc == 1 and "--overwrite" in capsys.readouterr().err
    assert run_merge(tmp_path, recipe, extra=("--overwrite",))[0] == 0
    assert not list(tmp_path.glob(f".{out.name}.*"))


def test_dare_is_bit_identical_on_rerun_and_depends_on_the_seed(models, tmp_path):
    recipe = recipe_for(models, "dare_ties", *params_for("dare_ties"), seed=3)
    first, second = run_merge(tmp_path, recipe, "a")[1], run_merge(tmp_path, recipe, "b")[1]
    other = run_merge(tmp_path, {**recipe, "seed": 4}, "c")[1]
    a, b, c = tensors(first), tensors(second), tensors(other)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_bfloat16_output_is_a_rounding_of_the_float32_merge(models, tmp_path):
    import json

    per = [{"weight": 0.4}, {"weight": 0.6}]
    rc32, out32 = run_merge(tmp_path, recipe_for(models, "task_arithmetic", {}, per), "f32")
    rc16, out16 = run_merge(tmp_path, recipe_for(models, "task_arithmetic", {}, per, dtype="bfloat16"), "bf16")
    assert rc32 == rc16 == 0
    f32, bf16 = tensors(out32), tensors(out16)
    for name, t in bf16.items():
        assert t.dtype == torch.bfloat16, name
        assert torch.equal(t, f32[name].to(torch.bfloat16)), name
    config = json.loads((out16 / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_small_shards_are_indexed_and_load(models, tmp_path):
    from transformers import AutoModelForCausalLM

    rc, out = run_merge(
        tmp_path, recipe_for(models, "linear", {}, [{"weight": 1.0}] * 2), extra=("--max-shard-size", "40KB")
    )
    assert rc == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    AutoModelForCausalLM.from_pretrained(out)


def test_linear_weight_flags_come_from_the_meta_model(models):
    from moemerge.config import Recipe
    from moemerge.merge.plan import plan_merge

    recipe = Recipe.model_validate(recipe_for(models, "wudi", {}, [{}, {}]))
    plan = plan_merge(recipe)
    assert "model.embed_tokens.weight" not in plan.linear_weights
    assert "lm_head.weight" not in plan.linear_weights
    assert "model.layers.0.self_attn.q_proj.weight" in plan.linear_weights
    assert "model.layers.0.mlp.experts.1.down_proj.weight" in plan.linear_weights
    assert not any(name.endswith("layernorm.weight") for name in plan.linear_weights)


def test_parse_size():
    from moemerge.units import parse_size

    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1234") == 1234
    assert parse_size(" 1.5 kib ") == 1536
    with pytest.raises(ValueError, match="size 'two gigs'"):
        parse_size("two gigs")


def test_integer_tensors_are_copied_from_the_base(models, tmp_path):
    def add_ids(offset: int):
        return lambda t: t.__setitem__("model.extra_ids", torch.arange(6, dtype=torch.int64) + offset)

    base = noisy_copy(models["base"], tmp_path / "base_ids", 0, add_ids(0))
    srcs = {f"s{i}": noisy_copy(base, tmp_path / f"s{i}_ids", i, add_ids(10 + i)) for i in range(2)}
    rc, out = run_merge(tmp_path, recipe_for({"base": base, **srcs}, "ties", {}, [{"density": 0.5}] * 2))
    assert rc == 0
    assert torch.equal(tensors(out)["model.extra_ids"], torch.arange(6))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without a GPU")
def test_cuda_falls_back_to_cpu_without_a_gpu(models, tmp_path):
    from moemerge.merge.plan import resolve_device

    assert resolve_device("cuda") == "cpu"
    assert (
        run_merge(tmp_path, recipe_for(models, "linear", {}, [{"weight": 1.0}] * 2), extra=("--device", "cuda"))[0] == 0
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", ["ties", "dare_ties", "wudi_exact"])
def test_cuda_merge_matches_cpu(models, tmp_path, method):
    recipe = recipe_for(models, method, *params_for(method))
    cpu = tensors(run_merge(tmp_path, recipe, "cpu")[1])
    rc, out = run_merge(tmp_path, recipe, "cuda", extra=("--device", "cuda"))
    assert rc == 0
    for name, t in tensors(out).items():  # random masks are drawn on the CPU, so DARE agrees too
        torch.testing.assert_close(t, cpu[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", [m for m in method_names() if get_method(m).row_separable])
def test_row_separable_kernels_merge_each_row_from_that_row_alone(method):
    """The flag's promise, checked on the kernel: merging row blocks and stacking them gives the same bits."""
    spec = get_method(method)
    shared, per_source = params_for(method)
    params, source_params = spec.parse_params(shared, per_source)
    generator = torch.Generator().manual_seed(5)
    base, *sources = (torch.randn(13, 7, generator=generator) for _ in range(4))
    ctx = TensorContext("model.embed_tokens.weight", seed=3)
    whole = spec(base if spec.needs_base else None, sources, source_params, params, ctx)
    rows = [(0, 5), (5, 6), (6, 13)]
    blocks = [
        spec(base[a:b] if spec.needs_base else None, [s[a:b] for s in sources], source_params, params, ctx)
        for a, b in rows
    ]
    assert torch.equal(torch.cat(blocks), whole)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_large_tensors_merged_in_row_blocks_are_bit_identical(models, method):
    """A tensor larger than the block is merged block by block (row-separable methods) with the same bits,
    in bfloat16 output; a method that is not row-separable merges it whole whatever the block size."""
    shared, per_source = params_for(method)
    recipe = MergeRecipe.model_validate(recipe_for(models, method, shared, per_source, dtype="bfloat16"))
    plan = plan_merge(recipe)
    names = [n for n in plan.names if len(plan.readers[plan.reference].info(n).shape) == 2][:6]
    for name in names:
        info = plan.readers[plan.reference].info(name)
        whole = merge_tensor(plan, name)
        row_bytes = math.prod(info.shape[1:]) * 4
        blocked = merge_tensor(plan, name, block_bytes=3 * row_bytes)  # blocks of 3 rows, a shorter last one
        assert blocked.dtype == torch.bfloat16 and torch.equal(blocked, whole), name


def test_a_nan_in_a_row_block_is_named_with_its_rows(models, tmp_path):
    """Merged in row blocks, a non-finite input is still refused, naming the model, tensor and rows."""
    name = "model.embed_tokens.weight"

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][7, 0] = float("nan")

    bad = noisy_copy(models["base"], tmp_path / "bad", seed=99, edit=poison)
    recipe = MergeRecipe.model_validate(
        {"merge_method": "linear", "models": [{"model": str(models["s0"])}, {"model": str(bad)}], "dtype": "float32"}
    )
    plan = plan_merge(recipe)
    row_bytes = math.prod(plan.readers[plan.reference].info(name).shape[1:]) * 4
    with pytest.raises(ValueError, match=rf"{bad}: tensor {name} \(rows 6:9\).*NaN"):
        merge_tensor(plan, name, block_bytes=3 * row_bytes)
