"""Shared fixtures: tiny models written to temporary folders (no network, no GPU)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message=".*(generation|GenerationConfig).*")


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Tests use tiny tensors: threads gain nothing, and OpenMP spin-waits make them crawl on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_olmoe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny OLMoE saved in two shards, so the sharded reader path is exercised."""
    from moemerge.architectures.tiny import save_tiny_model

    return save_tiny_model("olmoe", tmp_path_factory.mktemp("olmoe"), seed=1, max_shard_size="100KB")


def make_specialists(model_type: str, root: Path, *, num_sources: int = 2, **overrides) -> dict:
    """A tiny base, `num_sources` specialists and their stage-1 average, plus domain text files.

    Specialists differ from the base by random noise: strong on the routers (so routing differs
    between them), weak elsewhere. The domain text is real: the stdlib's own source code and
    pydoc's English topic prose, in samples of unequal length (so batches are padded).
    """
    import inspect
    import json as json_module
    import pydoc_data.topics

    import torch

    from moemerge.architectures.layout import load_layout
    from moemerge.architectures.tiny import save_tiny_model
    from moemerge.checkpoint.reader import CheckpointReader
    from moemerge.checkpoint.writer import CheckpointWriter

    base = save_tiny_model(model_type, root / "base", seed=0, **overrides)
    layout = load_layout(base)
    reader = CheckpointReader(base)
    sources = []
    for k in range(num_sources):
        generator = torch.Generator().manual_seed(100 + k)
        out = root / f"source{k}"
        with CheckpointWriter(out) as writer:
            for name in reader.names():
                tensor = reader.read(name)
                if tensor.is_floating_point() and tensor.numel() > 1:
                    scale = 1.0 if name in layout.router_tensors else 0.05
                    noise = torch.randn(tensor.shape, generator=generator) * tensor.float().std() * scale
                    tensor = (tensor.float() + noise).to(tensor.dtype)
                writer.add(name, tensor)
            writer.copy_support_files(base)
            writer.finalize()
        sources.append(out)
    readers = [CheckpointReader(s) for s in sources]
    with CheckpointWriter(root / "average") as writer:
        for name in reader.names():
            tensor = reader.read(name)
            if tensor.is_floating_point():
                tensor = (sum(r.read(name).double() for r in readers) / len(readers)).to(tensor.dtype)
            writer.add(name, tensor)
        writer.copy_support_files(base)
        writer.finalize()
    code_lines = inspect.getsource(json_module.decoder).splitlines()
    code = root / "code.jsonl"
    code.write_text(
        "\n".join(json_module.dumps({"text": "\n".join(code_lines[i : i + 3 + i % 5])}) for i in range(0, 160, 8))
    )
    prose = root / "prose.jsonl"
    topics = list(pydoc_data.topics.topics.values())
    prose.write_text("\n".join(json_module.dumps({"text": t[: 40 + 13 * i]}) for i, t in enumerate(topics[:20])))
    return {"base": base, "sources": sources, "average": root / "average", "data": [code, prose]}


def write_run_recipe(setup: dict, folder: Path, method: str = "task_arithmetic") -> Path:
    """`folder/recipe.yaml`: a `moemerge run` recipe merging `setup`'s specialists (from `make_specialists`)
    with `method`, then calibrating on their domain text, with 30 % of it held out for diagnose."""
    import yaml

    sources = [str(s) for s in setup["sources"]]
    recipe = {
        "merge_method": method,
        "base_model": str(setup["base"]),
        "models": [{"model": s, "parameters": {"weight": 1.0}} for s in sources],
        "dtype": "float32",
        "calibrate": {
            "domains": {s: [str(f)] for s, f in zip(sources, setup["data"], strict=True)},
            "data": {"max_length": 48, "heldout": 0.3},
            "batch_tokens": 256,
        },
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def without_timings(value):
    """A calibration summary without what was measured: wall and CPU times, and memory (`stages` is the walk's time
    and memory profile per layer; `memory` its plan, which starts from the process's own memory, and peak)."""
    if isinstance(value, dict):
        measured = ("seconds", "stages", "memory")
        return {k: without_timings(v) for k, v in value.items() if k not in measured}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def folder_contents(folder: Path) -> dict[str, object]:
    """Every file under `folder` by relative path: bytes, or for the calibration summary its JSON minus timings."""
    import json

    contents: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = str(path.relative_to(folder))
            raw = path.read_bytes()
            contents[key] = without_timings(json.loads(raw)) if path.name == "moemerge_calibration.json" else raw
    return contents


def rank_pid(tag: str, rank: int, timeout: float = 120) -> int:
    """The pid of torchrun worker `rank` of the job whose environment carries MOEMERGE_TEST_TAG=`tag` (/proc)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
            except OSError:
                continue
            if env.get("MOEMERGE_TEST_TAG") == tag and env.get("RANK") == str(rank) and "LOCAL_RANK" in env:
                return int(proc.name)
        time.sleep(0.05)
    raise AssertionError(f"no torchrun worker of rank {rank} appeared")
