"""Derive a model's MoE layout from its config: build it on the meta device and look.

transformers 5 gives every router a module of its own (`OlmoeTopKRouter`, `DeepseekV3TopkRouter`,
...), so which layers are MoE, the router's parameter names, the number of experts and top-k are
read from the model itself rather than typed in per family. In-memory names are turned into
on-disk names with transformers' own reverse weight conversion (the one `save_pretrained` uses),
so e.g. Mixtral's in-memory `mlp.gate` is found on disk as `block_sparse_moe.gate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moemerge.architectures.records import FAMILIES, UNSUPPORTED, FamilyRecord, RouterKind

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel


class ArchitectureError(ValueError):
    """A model whose family moemerge does not know or cannot handle."""


@dataclass(frozen=True)
class MoeLayer:
    """One MoE decoder layer: where its router lives in memory and on disk."""

    index: int
    router_module: str
    router_weight: str
    router_bias: str | None
    selection_bias: str | None
    num_experts: int
    top_k: int
    router_weight_in_memory: str
    router_bias_in_memory: str | None
    selection_bias_in_memory: str | None


@dataclass(frozen=True)
class ModelLayout:
    """Everything moemerge needs to know about one model's MoE structure."""

    family: FamilyRecord
    config: PretrainedConfig
    layers_module: str
    num_layers: int
    moe_layers: tuple[MoeLayer, ...]
    lookalikes: tuple[str, ...]

    @property
    def router_kind(self) -> RouterKind:
        return self.family.router_kind

    @property
    def dense_layers(self) -> tuple[int, ...]:
        moe = {layer.index for layer in self.moe_layers}
        return tuple(i for i in range(self.num_layers) if i not in moe)

    @cached_property
    def router_tensors(self) -> frozenset[str]:
        """On-disk names of every tensor stage 2 may rewrite (router weights and biases)."""
        names = set()
        for layer in self.moe_layers:
            names.add(layer.router_weight)
            if layer.router_bias:
                names.add(layer.router_bias)
        return frozenset(names)

    @cached_property
    def selection_biases(self) -> frozenset[str]:
        return frozenset(layer.selection_bias for layer in self.moe_layers if layer.selection_bias)


def read_config_dict(model_dir: str | Path) -> dict[str, Any]:
    """The raw `config.json` of a model folder, with errors that name the file."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ArchitectureError(f"{path}: no config.json in the model folder")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArchitectureError(f"{path}: corrupt JSON config ({err})") from err
    if not isinstance(data, dict):
        raise ArchitectureError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def detect_family(config: dict[str, Any], where: str = "config.json") -> FamilyRecord:
    """The family record of a config, from `model_type`, else from `architectures`."""
    model_type = config.get("model_type")
    if model_type is None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        by_class = {cls: mt for mt, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}
        model_type = next((by_class[a] for a in config.get("architectures", []) if a in by_class), None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in UNSUPPORTED:
        raise ArchitectureError(f"{where}: model_type {model_type!r} is not supported: {UNSUPPORTED[model_type]}")
    raise ArchitectureError(
        f"{where}: unknown MoE family {model_type!r}; known families: {', '.join(sorted(FAMILIES))}"
    )


def build_meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The causal-LM model of `config` with every tensor on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def disk_names(model: PreTrainedModel, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map in-memory names to on-disk names with transformers' own save-time conversion.

    Only one-to-one renamings are resolved this way (routers, norms, attention); fused expert
    tensors map to several on-disk tensors and are handled by the loader, not by name.
    """
    from transformers.core_model_loading import revert_weight_conversion

    result = {}
    for name, tensor in tensors.items():
        reverted = revert_weight_conversion(model, {name: tensor})
        if len(reverted) != 1:
            raise ArchitectureError(f"in-memory tensor {name} maps to {len(reverted)} on-disk tensors")
        result[name] = next(iter(reverted))
    return result


def embedding_disk_names(model: PreTrainedModel) -> tuple[frozenset[str], frozenset[str]]:
    """On-disk names of the input embedding's parameters and of the output head's, read off the (meta) model.

    With tied weights the head's names are the embedding's; a model without an output head has none.
    """
    module_names = {id(m): n for n, m in model.named_modules()}

    def names(module: torch.nn.Module | None) -> frozenset[str]:
        if module is None:
            return frozenset()
        prefix = module_names[id(module)]
        tensors = {f"{prefix}.{n}": p for n, p in module.named_parameters(recurse=False)}
        return frozenset(disk_names(model, tensors).values())

    return names(model.get_input_embeddings()), names(model.get_output_embeddings())


@dataclass(frozen=True)
class ExpertPiece:
    """Rows [start, stop) of one expert's matrix in a fused in-memory tensor, stored on disk as tensor `name`."""

    name: str
    start: int
    stop: int


def expert_pieces(model: PreTrainedModel, fused: str, shape: tuple[int, ...]) -> list[list[ExpertPiece]] | None:
    """Per expert, the on-disk tensors whose rows make up its slice of the fused in-memory tensor `fused`.

    `shape` is the fused tensor's (experts, rows, columns). The map is learnt from transformers' own
    save-time conversion applied to a probe of shape (experts, rows, 1) whose entries number the rows,
    so it is exactly the inverse of what `from_pretrained` does, without a layer-sized tensor. It lets
    a layer's experts be read one expert at a time in their storage dtype. None when the on-disk
    tensors are not whole rows of one expert each (experts fused or transposed on disk, e.g.
    GPT-OSS): such layers are converted whole.
    """
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    experts, rows = shape[0], shape[1]
    probe = torch.arange(experts * rows, dtype=torch.float64).reshape(experts, rows, 1)
    pieces: list[list[ExpertPiece]] = [[] for _ in range(experts)]
    for name, numbers in revert_weight_conversion(model, {fused: probe}).items():
        if numbers.dim() != 2 or numbers.shape[1] != 1:
            return None
        ids = numbers[:, 0].long()
        expert, start = divmod(int(ids[0]), rows)
        span = torch.arange(expert * rows + start, expert * rows + start + ids.numel())
        if start + ids.numel() > rows or not torch.equal(ids, span):
            return None
        pieces[expert].append(ExpertPiece(name, start, start + ids.numel()))
    for own in pieces:
        own.sort(key=lambda piece: piece.start)
        if [p.start for p in own] != [0] + [p.stop for p in own[:-1]] or own[-1].stop != rows:
            return None
    return pieces


def _decoder_layers(model: PreTrainedModel, num_layers: int) -> tuple[str, Any]:
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and len(module) == num_layers:
            return name, module
    raise ArchitectureError(f"{type(model).__name__}: no ModuleList of {num_layers} decoder layers found")


def _named_tensors(module: Any, prefix: str, recurse: bool) -> dict[str, torch.Tensor]:
    items = list(module.named_parameters(recurse=recurse)) + list(module.named_buffers(recurse=recurse))
    return {f"{prefix}.{n}": t for n, t in items}


def _router_of(layer: Any) -> tuple[str, Any] | None:
    routers = [(n, m) for n, m in layer.named_modules() if type(m).__name__.endswith("Router")]
    if len(routers) > 1:
        raise ArchitectureError(f"decoder layer has {len(routers)} router modules: {[n for n, _ in routers]}")
    return routers[0] if routers else None


def layout_from_config(config: PretrainedConfig, family: FamilyRecord) -> ModelLayout:
    """Derive the MoE layout of a model of `config` from its meta-device instance."""
    model = build_meta_model(config)
    num_layers = config.num_hidden_layers
    layers_name, layers = _decoder_layers(model, num_layers)
    all_tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    moe_layers, lookalikes = [], []
    for index, layer in enumerate(layers):
        prefix = f"{layers_name}.{index}"
        for name, module in layer.named_modules():
            if name.rsplit(".", 1)[-1] in family.lookalikes:
                lookalikes += disk_names(model, _named_tensors(module, f"{prefix}.{name}", True)).values()
        found = _router_of(layer)
        if found is None:
            continue
        router_name, router = found
        router_path = f"{prefix}.{router_name}"
        own = {
            n: t
            for n, t in _named_tensors(router, router_path, True).items()
            if n.rsplit(".", 1)[-1] != family.selection_bias
        }
        weights = [n for n, t in own.items() if t.dim() == 2]
        if len(weights) != 1:
            raise ArchitectureError(f"{router_path}: expected one 2-D router weight, found {weights}")
        num_experts = own[weights[0]].shape[0]
        biases = [n for n, t in own.items() if t.dim() == 1 and n.endswith("bias") and t.shape[0] == num_experts]
        selection = None
        if family.selection_bias:
            parent_path = router_path.rsplit(".", 1)[0]
            parent = model.get_submodule(parent_path)
            candidates = {
                **_named_tensors(parent, parent_path, False),
                **_named_tensors(router, router_path, True),
            }
            selection = next((n for n in candidates if n.rsplit(".", 1)[-1] == family.selection_bias), None)
            if selection is None:
                raise ArchitectureError(f"{router_path}: selection bias {family.selection_bias!r} not found")
        keep = weights + biases + ([selection] if selection else [])
        wanted = {n: all_tensors[n] for n in keep}
        names = disk_names(model, wanted)
        top_k = getattr(router, "top_k", None) or config.num_experts_per_tok
        moe_layers.append(
            MoeLayer(
                index=index,
                router_module=router_path,
                router_weight=names[weights[0]],
                router_bias=names[biases[0]] if biases else None,
                selection_bias=names[selection] if selection else None,
                num_experts=int(num_experts),
                top_k=int(top_k),
                router_weight_in_memory=weights[0],
                router_bias_in_memory=biases[0] if biases else None,
                selection_bias_in_memory=selection,
            )
        )
    if not moe_layers:
        raise ArchitectureError(f"{family.model_type}: the model has no MoE layer (no router module found)")
    return ModelLayout(family, config, layers_name, num_layers, tuple(moe_layers), tuple(sorted(lookalikes)))


def load_layout(model_dir: str | Path) -> ModelLayout:
    """Detect the family of a model folder and derive its MoE layout (no weights are read)."""
    from transformers import AutoConfig

    raw = read_config_dict(model_dir)
    family = detect_family(raw, where=str(Path(model_dir) / "config.json"))
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as err:  # transformers raises many types for a bad config
        raise ArchitectureError(f"{Path(model_dir) / 'config.json'}: transformers cannot read it ({err})") from err
    return layout_from_config(config, family)


def transformers_moe_families() -> list[str]:
    """Every causal-LM `model_type` of the installed transformers whose modeling code has a router.

    This is the list moemerge measures its coverage against: each entry must be either in
    `FAMILIES` or in `UNSUPPORTED` with a reason (a test enforces it).
    """
    import importlib
    import inspect

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    families = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except ImportError:
            continue
        if any(
            inspect.isclass(obj) and name.endswith("Router") and obj.__module__ == module.__name__
            for name, obj in vars(module).items()
        ):
            families.append(model_type)
    return sorted(families)
