"""Model references: a local folder, or a Hugging Face Hub repo id with an optional revision.

A reference is resolved to a local folder once, where the inputs of a command are gathered (the
recipe's models, or the CLI's model flags), so that everything below it reads plain folders:

- a local folder of that name wins;
- otherwise ``org/name`` or ``org/name@revision`` (mergekit's spelling; a branch, tag or commit;
  mergekit's mapping ``{model: {path: org/name, revision: rev}}`` too) is a Hub repo. The revision
  is resolved to one commit first, and every file comes from that commit. Files land in the
  user's normal Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), where transformers and vLLM
  find them again; ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and private repos behave as in transformers,
  because huggingface_hub does the resolving, caching and auth.

Only what moemerge reads is downloaded: the safetensors shards named by the index (or the single
``model.safetensors``), the index, config, generation config, tokenizer and chat-template files.
The plan comes before any weight moves: the repo listing refuses a pickle-only repo, then the
small files and each shard's safetensors header (a ranged request of its first bytes) are fetched,
and the family and every tensor's name and shape are compared across all models of the command.
A mismatch is reported before gigabytes are downloaded. Provenance needs no bookkeeping: a folder
in the Hub cache (``models--org--name/snapshots/<commit>``) names its repo and commit
(`provenance`).

huggingface_hub is imported inside functions: importing this module must stay cheap for the CLI.
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moemerge.checkpoint.reader import INDEX_FILE, PICKLE_PATTERNS, SINGLE_FILE, CheckpointError, TensorInfo

SUPPORT_PATTERNS = (
    "config.json",
    "generation_config.json",
    INDEX_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)
"""Every file moemerge reads besides the weights: config, generation config, index, tokenizer, chat template."""

_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"(?:{_NAME}/)?{_NAME}")
"""A Hub repo id, ``name`` or ``namespace/name`` (as huggingface_hub validates it, plus no ``--``, ``..``)."""
_REVISION = re.compile(r"[^\s@+]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubError(CheckpointError):
    """A model reference that cannot be resolved; the message names the reference and the reason."""


@dataclass(frozen=True)
class ModelRef:
    """A Hub model: repo id and revision (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def parse_model_ref(text: str) -> ModelRef:
    """``org/name`` or ``org/name@revision`` (mergekit's ``path@revision``); mergekit's ``+lora`` is refused."""
    if "+" in text:
        raise HubError(
            f"{text}: LoRA adapters (mergekit's MODEL+LORA) are not supported; merge the adapter into its model "
            "and save that as safetensors first"
        )
    repo_id, at, revision = text.partition("@")
    if not REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        raise HubError(f"{text}: not a local model folder, nor a Hub repo id (org/name or org/name@revision)")
    if at and not _REVISION.fullmatch(revision):
        raise HubError(f"{text}: the revision after '@' must be a branch, tag or commit without spaces or '@'")
    return ModelRef(repo_id, revision if at else None)


def model_ref_text(value: Any) -> Any:
    """mergekit's mapping spelling of a model (``{model: {path: P, revision: R}}``, or ``{path, revision}``)
    as the one string form ``P@R``; any other value is returned unchanged for the schema to judge."""
    if isinstance(value, dict) and set(value) <= {"model", "lora"} and "model" in value:
        if value.get("lora"):
            raise ValueError("LoRA adapters (mergekit's lora:) are not supported; merge the adapter into its model")
        value = value["model"]
    if isinstance(value, dict) and set(value) <= {"path", "revision"} and isinstance(value.get("path"), str):
        return f"{value['path']}@{value['revision']}" if value.get("revision") else value["path"]
    return value


def is_hub_ref(text: str) -> bool:
    """Resolved on the Hub: not a local folder, and spelled ``org/name`` (with ``@rev`` or ``+lora``).

    The owner part is required (every MoE checkpoint on the Hub has one), so that a bare word such as
    ``base`` is reported as the missing local folder it most likely is, without a Hub lookup.
    """
    if Path(text).is_dir():
        return False
    repo_id = re.split(r"[@+]", text, maxsplit=1)[0]
    return "/" in repo_id and bool(REPO_ID.fullmatch(repo_id))


def provenance(model_dir: str | Path) -> dict[str, str] | None:
    """``{"repo_id", "commit"}`` of a folder in the Hub cache (``.../models--org--name/snapshots/<commit>``),
    or None for any other folder."""
    folder = Path(model_dir)
    if folder.parent.name != "snapshots" or not _COMMIT.fullmatch(folder.name):
        return None
    repo_folder = folder.parent.parent.name
    if not repo_folder.startswith("models--"):
        return None
    return {"repo_id": repo_folder[len("models--") :].replace("--", "/"), "commit": folder.name}


@dataclass
class _Planned:
    """One Hub model after the small files and headers, before its weights."""

    ref: ModelRef
    revision: Any  # huggingface_hub.ResolvedRevision: the requested name, and the commit it resolved to
    folder: Path
    weights: list[str]
    tensors: dict[str, TensorInfo]
    config: dict[str, Any]


_RESOLVED: dict[str, str] = {}
"""Each reference resolves once per process, so stage 1, stage 2 and diagnose read the same commit."""


def resolve_models(refs: Iterable[str], *, progress: bool = True) -> dict[str, str]:
    """Local folder (or the reference unchanged) for every reference; Hub models downloaded after the plan.

    A reference that is neither a local folder nor spelled like a repo id is returned unchanged, so
    the reader reports it as the missing folder it is.
    """
    refs = list(dict.fromkeys(refs))
    resolved = {ref: _RESOLVED.get(ref, ref) for ref in refs}
    pending = [ref for ref in refs if ref not in _RESOLVED and is_hub_ref(ref)]
    if not pending:
        return resolved
    planned = {ref: _plan(parse_model_ref(ref), progress) for ref in pending}
    _check_agree(
        {ref: (p.config, p.tensors) for ref, p in planned.items()}
        | {ref: _local_view(resolved[ref]) for ref in refs if ref not in planned and Path(resolved[ref]).is_dir()}
    )
    for ref, plan in planned.items():
        _download_weights(plan)
        _RESOLVED[ref] = resolved[ref] = str(plan.folder)
    return resolved


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    return (
        errors.HfHubHTTPError,
        errors.LocalEntryNotFoundError,
        errors.RevisionResolutionError,
        errors.OfflineModeIsEnabled,
        errors.SafetensorsParsingError,
        OSError,
    )


def _explain(ref: ModelRef, err: BaseException) -> HubError:
    from huggingface_hub import errors

    if isinstance(err, errors.GatedRepoError):
        reason = f"Hub repo {ref.repo_id} is gated: accept its terms on the Hub and log in (or set HF_TOKEN)"
    elif isinstance(err, errors.RepositoryNotFoundError):
        reason = (
            f"no local folder of that name, and no Hub model repo {ref.repo_id} "
            "(if it is private, log in with `hf auth login` or set HF_TOKEN)"
        )
    elif isinstance(err, errors.RevisionNotFoundError):
        reason = f"Hub repo {ref.repo_id} has no revision {ref.revision!r} (branch, tag or commit)"
    elif isinstance(err, errors.RemoteEntryNotFoundError):
        missing = err.response.url.path.rsplit("/", 1)[-1] if err.response is not None else "a file"
        reason = f"Hub repo {ref.repo_id} has no file {missing}"
    elif isinstance(err, errors.IncompleteSnapshotError):
        reason = "the cached snapshot is incomplete and the Hub cannot be reached (HF_HUB_OFFLINE, or no network)"
    elif isinstance(err, errors.RevisionResolutionError | errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        reason = "not in the local Hugging Face cache, and the Hub cannot be reached (HF_HUB_OFFLINE, or no network)"
    else:
        reason = " ".join(str(err).split()) or type(err).__name__
    return HubError(f"{ref}: {reason}")


def _plan(ref: ModelRef, progress: bool) -> _Planned:
    """Resolve the revision, list the repo, fetch the small files and the shard headers: no weights."""
    from huggingface_hub import HfApi, is_offline_mode, snapshot_download

    api = HfApi()
    try:
        revision = api.resolve_revision(ref.repo_id, revision=ref.revision, local_files_only=is_offline_mode())
        listing = _listing(api, ref.repo_id, revision.resolved)
        if listing is not None:
            _refuse_without_safetensors(ref, listing)
        folder = Path(snapshot_download(ref.repo_id, revision=revision, allow_patterns=list(SUPPORT_PATTERNS)))
        weights = _weight_files(ref, folder, listing)
        tensors = {}
        for weight in weights:
            tensors |= _remote_header(api, ref, revision.resolved, folder, weight)
    except _hub_errors() as err:
        raise _explain(ref, err) from err
    config = _read_config(ref, folder)
    missing = [w for w in weights if not (folder / w).is_file()]
    size = sum(listing[w] or 0 for w in missing) if listing is not None else None
    if progress:
        where = f"{ref.repo_id}@{revision} (commit {revision.resolved[:12]})"
        todo = f"{len(missing)} weight file(s)" + (f", {_bytes(size)}" if size is not None else "")
        print(f"moemerge: {where}: {len(tensors)} tensors, {todo} to download", file=sys.stderr)
    return _Planned(ref, revision, folder, weights, tensors, config)


def _bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _listing(api: Any, repo_id: str, commit: str) -> dict[str, int | None] | None:
    """Path -> size of every file at the commit: from the cache's tree listing, else from the Hub; None offline."""
    from huggingface_hub import RepoFile, get_cached_repo_tree, is_offline_mode
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return {f.path: f.size for f in get_cached_repo_tree(repo_id, revision=commit)}
    except CachedRepoTreeNotFoundError:
        if is_offline_mode():
            return None
    return {
        f.path: f.size for f in api.list_repo_tree(repo_id, revision=commit, recursive=True) if isinstance(f, RepoFile)
    }


def _refuse_without_safetensors(ref: ModelRef, listing: dict[str, int | None]) -> None:
    if INDEX_FILE in listing or SINGLE_FILE in listing:
        return
    pickles = sorted(f for f in listing if any(fnmatch.fnmatch(f, p) for p in PICKLE_PATTERNS))
    if pickles:
        raise HubError(
            f"{ref}: Hub repo {ref.repo_id} has only pickle weights ({', '.join(pickles[:3])}); moemerge loads "
            "safetensors only, because unpickling can run arbitrary code. Nothing was downloaded."
        )
    raise HubError(f"{ref}: Hub repo {ref.repo_id} has no {SINGLE_FILE} or {INDEX_FILE}; nothing was downloaded")


def _weight_files(ref: ModelRef, folder: Path, listing: dict[str, int | None] | None) -> list[str]:
    """The shards the index names, or the single file: exactly what the reader will open."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weights = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise HubError(f"{ref}: {INDEX_FILE} is corrupt ({err!r})") from err
        absent = [w for w in weights if listing is not None and w not in listing]
        if absent:
            raise HubError(f"{ref}: {INDEX_FILE} names shard {absent[0]}, which Hub repo {ref.repo_id} does not have")
        return weights
    if listing is None and not (folder / SINGLE_FILE).is_file():
        raise HubError(f"{ref}: no {SINGLE_FILE} or {INDEX_FILE} in the local cache, and the Hub cannot be reached")
    return [SINGLE_FILE]


def _remote_header(api: Any, ref: ModelRef, commit: str, folder: Path, weight: str) -> dict[str, TensorInfo]:
    """One shard's tensors from its safetensors header: read locally when cached, else a ranged request."""
    from moemerge.checkpoint.reader import SAFETENSORS_DTYPES, read_header

    if (folder / weight).is_file():
        return read_header(folder / weight)
    metadata = api.parse_safetensors_file_metadata(ref.repo_id, weight, revision=commit)
    tensors = {}
    for name, info in metadata.tensors.items():
        if info.dtype not in SAFETENSORS_DTYPES:
            raise HubError(f"{ref}: {weight}: tensor {name} has unsupported dtype {info.dtype!r}")
        tensors[name] = TensorInfo(name, tuple(info.shape), info.dtype, folder / weight)
    return tensors


def _read_config(ref: ModelRef, folder: Path) -> dict[str, Any]:
    from moemerge.architectures.layout import detect_family, read_config_dict

    config = read_config_dict(folder)
    detect_family(config, where=f"{ref} config.json")  # an unsupported family stops here, before the weights
    return config


def _local_view(folder: str) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    from moemerge.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(folder)
    return reader.config, {name: reader.info(name) for name in reader.names()}


def _check_agree(models: dict[str, tuple[dict[str, Any], dict[str, TensorInfo]]]) -> None:
    """Every model of one command is a fine-tune of one architecture: family, tensor names and shapes agree."""
    if len(models) < 2:
        return
    (first, (first_config, first_tensors)), *others = models.items()
    for ref, (config, tensors) in others:
        if config.get("model_type") != first_config.get("model_type"):
            raise HubError(
                f"{ref}: model_type {config.get('model_type')!r} differs from {first_config.get('model_type')!r} "
                f"of {first}; nothing was downloaded"
            )
        for name, want in first_tensors.items():
            got = tensors.get(name)
            if got is None:
                raise HubError(f"{ref}: has no tensor {name} (present in {first}); nothing was downloaded")
            if got.shape != want.shape:
                raise HubError(
                    f"{ref}: tensor {name} has shape {list(got.shape)}, expected {list(want.shape)} as in {first}; "
                    "nothing was downloaded"
                )
        extra = sorted(set(tensors) - set(first_tensors))
        if extra:
            raise HubError(f"{ref}: tensor {extra[0]} is not in {first}; nothing was downloaded")


def _download_weights(plan: _Planned) -> None:
    """The weights, with huggingface_hub's progress bars (HF_HUB_DISABLE_PROGRESS_BARS turns them off)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(plan.ref.repo_id, revision=plan.revision, allow_patterns=[*SUPPORT_PATTERNS, *plan.weights])
    except _hub_errors() as err:
        raise _explain(plan.ref, err) from err
