"""Models by Hub id and calibration text from Hub datasets, through the real huggingface_hub and datasets code.

The Hub is `tests/hub_server.py` on 127.0.0.1, reached through HF_ENDPOINT, with HF_HOME in a
temporary folder. huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported
(`huggingface_hub.constants`), as transformers does, so each scenario runs the moemerge CLI in a
fresh interpreter with those variables set: the environment behaves exactly as a user's would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_specialists
from hub_server import LocalHub, folder_files

TOKEN = "hf_local_test_token"

_RUN_MAINS = """
import contextlib, io, json, sys
from moemerge.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    results[name] = {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(results))
"""


def _sharded_copy(folder: Path, out: Path) -> Path:
    """`folder` re-written in shards of about 100 kB, so that the index and several headers are fetched."""
    from moemerge.checkpoint.reader import CheckpointReader
    from moemerge.checkpoint.writer import CheckpointWriter

    reader = CheckpointReader(folder)
    with CheckpointWriter(out, max_shard_bytes=100_000) as writer:
        for name in reader.names():
            writer.add(name, reader.read(name))
        writer.copy_support_files(folder)
        writer.finalize()
    return out


def _parquet(rows: list[dict], path: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    """The served repos: a base with two revisions, two specialists, a pickle-only repo, a repo of another
    shape, a repo whose index names a missing shard, and a dataset of two-column rows in Parquet."""
    import pydoc_data.topics

    from moemerge.architectures.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("hub-content")
    setup = make_specialists("olmoe", root)
    decoy = {"README.md": b"# card\n", "original/consolidated.safetensors": b"\0" * 4096}
    with LocalHub() as server:
        base = server.repo("org/base")
        setup["sha_v1"] = base.commit(folder_files(setup["average"]) | decoy, tags=("v1",))
        setup["sha_main"] = base.commit(folder_files(_sharded_copy(setup["base"], root / "sharded")) | decoy)
        for k, source in enumerate(setup["sources"]):
            setup[f"sha_source{k}"] = server.repo(f"org/source{k}").commit(folder_files(source) | decoy)
        server.repo("org/source1").token = TOKEN  # private: only HF_TOKEN opens it
        pickled = {"config.json": (setup["base"] / "config.json").read_bytes(), "pytorch_model.bin": b"\x80" * 8192}
        server.repo("org/pickled").commit(pickled)
        wide = save_tiny_model("olmoe", root / "wide", seed=0, intermediate_size=24)
        server.repo("org/wide").commit(folder_files(wide))
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        broken = {"config.json": pickled["config.json"], "model.safetensors.index.json": json.dumps(index).encode()}
        server.repo("org/broken").commit(broken | {"model-00001-of-00002.safetensors": b"\0" * 64})
        topics = list(pydoc_data.topics.topics.items())[:20]
        rows = [{"title": title, "body": body[: 40 + 13 * i]} for i, (title, body) in enumerate(topics)]
        parquet = _parquet(rows, root / "prose.parquet")
        setup["sha_prose"] = server.repo("org/prose", "dataset").commit({"data/train-00000-of-00001.parquet": parquet})
        setup["prose_rows"] = rows
        yield server, setup


def _env(server: LocalHub, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    return env | {
        "HF_ENDPOINT": server.endpoint,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        **extra,
    }


def _mains(server: LocalHub, home: Path, calls: dict[str, list[str]], **env: str) -> dict[str, dict]:
    """Run `moemerge.cli.main(argv)` for each call in one fresh interpreter; rc, stdout and stderr by name."""
    done = subprocess.run(
        [sys.executable, "-c", _RUN_MAINS, json.dumps(calls)],
        env=_env(server, home, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _error_lines(result: dict) -> list[str]:
    return [line for line in result["stderr"].splitlines() if line.startswith("moemerge: error:")]


def test_run_recipe_with_hub_models_and_a_hub_dataset(hub, tmp_path: Path) -> None:
    """`moemerge run` on Hub ids (plain, @revision, mergekit's mapping; one private, opened by HF_TOKEN) with a
    dataset split slice: stage 1 merges the resolved commits, and card and calibration report name ids and commits."""
    from safetensors.torch import load_file

    server, setup = hub
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "org/base",
        "models": [
            {"model": "org/source0@main", "parameters": {"weight": 1.0}},
            {"model": {"model": {"path": "org/source1", "revision": "main"}}, "parameters": {"weight": 1.0}},
        ],
        "dtype": "float32",
        "calibrate": {
            "domains": {
                "org/source0@main": [str(setup["data"][0])],
                "org/source1@main": [{"dataset": "org/prose", "split": "train[:12]", "sample": "{title}\n{body}"}],
            },
            "data": {"max_length": 48},
            "batch_tokens": 256,
        },
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-m", "moemerge", "run", str(tmp_path / "recipe.yaml"), "-o", str(out), "--quiet"],
        env=_env(server, tmp_path / "hf", HF_TOKEN=TOKEN),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    # Stage 1 is base + sum of task vectors of the served main commits (not the v1 base).
    stage1 = load_file(str(tmp_path / "merged.stage1" / "model.safetensors"))
    base = load_file(str(setup["base"] / "model.safetensors"))
    sources = [load_file(str(s / "model.safetensors")) for s in setup["sources"]]
    name = next(n for n in base if n.endswith("q_proj.weight"))
    expected = base[name].double() + sum(s[name].double() - base[name].double() for s in sources)
    assert (stage1[name].double() - expected).abs().max() < 1e-5

    card = (tmp_path / "merged.stage1" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["org/base", "org/source0", "org/source1"]
    assert f"`org/base` at commit `{setup['sha_main']}` (base)" in card
    assert f"`org/source1` at commit `{setup['sha_source1']}`" in card

    summary = json.loads((out / "moemerge_calibration.json").read_text())
    origins = {o["repo_id"]: o["commit"] for o in summary["provenance"].values() if o}
    assert origins == {"org/source0": setup["sha_source0"], "org/source1": setup["sha_source1"]}
    records = {r.get("dataset") or r.get("file"): (r, d) for d in summary["data"].values() for r in d["inputs"]}
    prose, domain = records["org/prose"]
    assert prose == {
        "dataset": "org/prose",
        "config": None,
        "split": "train[:12]",
        "revision": None,
        "commit": setup["sha_prose"],
        "rows": 12,
    }
    assert domain["samples"] == domain["calibration"] == 12 and domain["heldout"] == 0
    code, _ = records[str(setup["data"][0])]
    assert code["rows"] == len(setup["data"][0].read_text().splitlines())

    # Only what moemerge reads moved: no card, no decoy weights, no pickle, from any model repo.
    fetched = {path.rsplit("/", 1)[-1] for method, path, _ in server.log if method == "GET" and "/resolve/" in path}
    assert not fetched & {"README.md", "consolidated.safetensors", "pytorch_model.bin"}


@pytest.fixture(scope="module")
def online(hub, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict], Path, int]:
    """One interpreter runs the CLI on revisions, refusals and errors; the cache it warms serves `offline`."""
    server, setup = hub
    home = tmp_path_factory.mktemp("hf-online")
    data = setup["data"][0]
    calls = {
        "main": ["inspect", "org/base", "--json"],
        "v1": ["inspect", "org/base@v1", "--json"],
        "pickled": ["inspect", "org/pickled"],
        "no_repo": ["inspect", "org/nope"],
        "private": ["inspect", "org/source1"],
        "no_dataset": [
            "calibrate",
            "--merged",
            "org/base",
            "--source",
            "org/base",
            "--data",
            "org/base=org/nodata:train",
        ]
        + ["-o", str(home / "never")],
        "no_revision": ["inspect", "org/base@nope"],
        "no_shard": ["inspect", "org/broken"],
        "lora": ["inspect", "org/base+org/adapter"],
        "mismatch": ["calibrate", "--merged", "org/base", "--source", "org/wide", "--data", f"org/wide={data}"]
        + ["-o", str(home / "never")],
    }
    results = _mains(server, home, calls)
    return results, home, len(server.log)


def test_revision_pins_the_commit(hub, online) -> None:
    server, setup = hub
    results, _, _ = online
    for name, sha, folder in (("main", "sha_main", "sharded"), ("v1", "sha_v1", "average")):
        assert results[name]["rc"] == 0, results[name]["stderr"]
        summary = json.loads(results[name]["stdout"])
        resolved = Path(summary["model"])
        assert resolved.name == setup[sha] and resolved.parent.parent.name == "models--org--base"
        served = setup["base"].parent / folder
        for weights in served.glob("*.safetensors"):
            assert (resolved / weights.name).read_bytes() == weights.read_bytes()
        assert not (resolved / "README.md").exists() and not (resolved / "original").exists()


def test_pickle_only_repo_is_refused_before_any_weight_moves(hub, online) -> None:
    server, _ = hub
    results, _, _ = online
    (line,) = _error_lines(results["pickled"])
    assert results["pickled"]["rc"] == 1
    assert "org/pickled" in line and "pytorch_model.bin" in line and "safetensors" in line
    assert server.requested("pytorch_model.bin") == []


@pytest.mark.parametrize(
    ("call", "fragments"),
    [
        ("no_repo", ["org/nope", "no Hub model repo org/nope"]),
        ("private", ["org/source1", "HF_TOKEN"]),
        ("no_dataset", ["org/nodata:train", "no Hub dataset org/nodata"]),
        ("no_revision", ["org/base@nope", "no revision 'nope'"]),
        ("no_shard", ["org/broken", "model-00002-of-00002.safetensors"]),
        ("lora", ["org/base+org/adapter", "LoRA"]),
    ],
)
def test_missing_repo_revision_or_file_is_one_line(online, call: str, fragments: list[str]) -> None:
    results, _, _ = online
    assert results[call]["rc"] == 1
    (line,) = _error_lines(results[call])
    assert all(fragment in line for fragment in fragments), line


def test_shape_mismatch_is_found_from_headers_before_weights_download(hub, online) -> None:
    server, _ = hub
    results, _, _ = online
    (line,) = _error_lines(results["mismatch"])
    assert "org/wide" in line and "shape" in line and "nothing was downloaded" in line
    wide_weights = [entry for entry in server.requested("org/wide/resolve/") if entry[1].endswith(".safetensors")]
    assert wide_weights and all(method == "HEAD" or rng.startswith("bytes=") for method, _, rng in wide_weights)


def test_offline_mode_reads_the_warm_cache_without_a_request(hub, online) -> None:
    server, setup = hub
    results, home, _ = online
    before = len(server.log)
    offline = _mains(
        server,
        home,
        {"main": ["inspect", "org/base", "--json"], "v1": ["inspect", "org/base@v1", "--json"]}
        | {"cold": ["inspect", "org/source0"]},
        HF_HUB_OFFLINE="1",
    )
    assert len(server.log) == before
    for name in ("main", "v1"):
        assert offline[name]["rc"] == 0, offline[name]["stderr"]
        assert json.loads(offline[name]["stdout"]) == json.loads(results[name]["stdout"])
    (line,) = _error_lines(offline["cold"])
    assert "org/source0" in line and "local Hugging Face cache" in line


def test_local_folder_wins_over_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder named like a repo id is read as it is, with no Hub lookup (HF_ENDPOINT points nowhere)."""
    from moemerge.architectures.tiny import save_tiny_model
    from moemerge.checkpoint.hub import resolve_models

    monkeypatch.chdir(tmp_path)
    save_tiny_model("olmoe", tmp_path / "org" / "base")
    assert resolve_models(["org/base", "org/base"]) == {"org/base": "org/base"}
