"""Run a checkpoint one decoder layer at a time, with transformers' own modules.

The model is built with its parameters on the meta device (buffers such as rotary frequencies
are real, computed by the model's own constructor), so memory holds what lies outside the layers
(embeddings, final norm, output head) plus one decoder layer at a time; a walk without the output head
(``head=False``, the calibration walk) holds neither head nor embedding, reading each batch's embedding
rows from the memory-mapped checkpoint. What the model passes into each decoder layer besides the hidden
states (position embeddings, the attention mask of that layer's attention type, position ids)
is recorded by running the model's own forward with every decoder layer replaced by a recorder
that returns its input unchanged; this keeps the runner generic over families. A layer's
weights are materialised from the on-disk tensors with transformers' own weight conversion (the
one `from_pretrained` uses), so fused in-memory expert layouts come out exactly as transformers
builds them, and are released again when the layer is done.

Converting a whole layer that way holds the tensors as read, the converted pieces and the result at
once (about 3 layers plus its on-disk bytes). With ``experts="resident"`` or ``"lazy"`` the experts
are not converted: an ``ExpertBank`` (moemerge/calibrate/fused_experts.py) holds them in their
storage dtype, filled one on-disk piece at a time (resident) or read one expert at a time when used
(lazy), and the experts module runs from it one expert at a time; only the rest of the layer
(attention, norms, router, shared experts) goes through transformers' conversion.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch

from moemerge.architectures.layout import ModelLayout, embedding_disk_names, expert_pieces
from moemerge.calibrate.fused_experts import MATRICES, ExpertBank, banks_experts, install_bank, remove_bank
from moemerge.checkpoint.reader import SAFETENSORS_DTYPES, CheckpointReader

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
"""Which decoder layer an on-disk tensor belongs to (the planner groups names the same way)."""


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return getattr(library, "malloc_trim", None)


def return_freed_memory() -> None:
    """Hand the C allocator's freed pages back to the system.

    A layer's materialisation frees many mid-sized pieces (tensors as read, converted parts) that
    glibc keeps for reuse; without this the resident memory of a walk stays above the memory
    planner's estimate, which counts live tensors (benchmarks/experts_memory.py measures both).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device but buffers for real (like accelerate's init_empty_weights)."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(module._parameters[name].to("meta"), **kwargs)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The causal LM of `config` with parameters on meta and real buffers, in `dtype`."""
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _parameters_on_meta():
            # dtype explicitly: from_config would take config.dtype (bf16 for most checkpoints) over the default
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


class _Recorder(torch.nn.Module):
    """Stands in for a decoder layer: records what it is called with, returns the hidden states."""

    def __init__(self, inner: torch.nn.Module, sink: dict[int, tuple[torch.Tensor, dict[str, Any]]], index: int):
        super().__init__()
        self.inner = inner
        self.sink = sink
        self.index = index

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TypeError("decoder layers called with positional arguments beyond hidden_states are not supported")
        self.sink[self.index] = (hidden_states, kwargs)
        return hidden_states


ExpertsHeld = Literal["convert", "resident", "lazy"]
"""How a materialised layer holds its experts: converted with the layer (transformers' layout, forward
dtype), in a resident bank (storage dtype, once), or in a lazy bank (read from disk when used)."""


def walk_without_head(model: PreTrainedModel) -> tuple[str | None, frozenset[str]]:
    """What a walk without the output head reads differently, read off the (meta) model: the on-disk name of the
    input embedding when it can be read by rows (:meth:`LayerWalker._embed`: one ``weight`` looked up by token
    id; else None, and it is loaded whole), and the on-disk tensors outside the layers that such a walk does not
    hold: the head (unless tied to the embedding), and the embedding where it is read by rows."""
    embedding, head = embedding_disk_names(model)
    params = dict(model.get_input_embeddings().named_parameters(recurse=False))
    if len(embedding) == 1 and list(params) == ["weight"]:
        return next(iter(embedding)), embedding | head
    return None, head - embedding


class LayerWalker:
    """One checkpoint, run layer by layer: embeddings, per-layer inputs, one materialised layer at a time."""

    def __init__(
        self,
        model_dir: str,
        layout: ModelLayout,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        experts: ExpertsHeld = "convert",
        head: bool = True,
    ):
        """``head=False`` (the calibration walk, which never computes logits): the output head is not loaded and
        the input embedding is not held either; each batch's rows of it are read from disk (:meth:`_embed`)."""
        self.layout = layout
        self.experts = experts
        self.head = head
        self.dtype = dtype
        self.device = torch.device(device)
        self.reader = CheckpointReader(model_dir)
        self.model = build_skeleton(layout.config, dtype)
        self.base = getattr(self.model, self.model.base_model_prefix)
        self.layers = self.model.get_submodule(layout.layers_module)
        self._by_layer: dict[int, list[str]] = {}
        outside = []
        for name in self.reader.names():
            match = LAYER_INDEX.search(name)
            if match:
                self._by_layer.setdefault(int(match.group(1)), []).append(name)
            else:
                outside.append(name)
        self._embedding, skipped = (None, frozenset()) if head else walk_without_head(self.model)
        self._load([name for name in outside if name not in skipped])
        self.model.tie_weights()  # a tied output head shares the embedding just loaded
        self._to_device(self.model)

    def _load(self, names: list[str]) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        # Copies: a parameter loaded in its on-disk dtype would otherwise share memory with the
        # reader's mapped tensor, and installing a calibrated router would change later reads.
        state = {name: self.reader.read(name).clone() for name in names}
        mapping = get_model_conversion_mapping(self.model)
        config = LoadStateDictConfig(weight_mapping=mapping, dtype=self.dtype)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one "Loading weights" bar per layer would drown the run's own bar
        try:
            convert_and_load_state_dict_in_model(self.model, state, config)
            # transformers keeps only the conversions this load used, for saving; keep every one (as for a model
            # built from its config), since banked experts never pass through theirs yet are converted back with it
            used = [c for c in mapping if c.was_used() or not isinstance(c, PrefixChange)]
            self.model._weight_conversions = used
        finally:
            if bars:
                hf_logging.enable_progress_bar()

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of a batch, from a table of only the rows it uses (read from the memory-mapped
        checkpoint): the embedding module's own forward (any scaling included), on ids renumbered into that
        table, so the values are those of the whole table converted to the forward dtype."""
        module = self.model.get_input_embeddings()
        used, renumbered = torch.unique(input_ids, return_inverse=True)
        rows = self.reader.read(self._embedding)[used].to(self.device, self.dtype)
        whole = module._parameters["weight"]
        module._parameters["weight"] = torch.nn.Parameter(rows, requires_grad=False)
        try:
            return module(renumbered.to(self.device))
        finally:
            module._parameters["weight"] = whole

    def layer_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
        """(hidden states, keyword arguments) the model passes into each decoder layer for this batch.

        Only layer 0's hidden states are the real ones (later layers get layer 0's, unchanged,
        from the recorders); the keyword arguments of every layer are exact.
        """
        sink: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}
        originals = list(self.layers)
        for index, layer in enumerate(originals):
            self.layers[index] = _Recorder(layer, sink, index)
        try:
            with torch.no_grad():
                tokens = {"inputs_embeds": self._embed(input_ids)} if self._embedding else {"input_ids": input_ids}
                self.base(
                    **{k: v.to(self.device) for k, v in tokens.items()},
                    attention_mask=attention_mask.to(self.device),
                    use_cache=False,
                )
        finally:
            for index, layer in enumerate(originals):
                self.layers[index] = layer
        return [sink[i] for i in range(len(originals))]

    def expert_banks(self, index: int) -> dict[str, dict[str, list]]:
        """Experts modules of layer `index` a bank can hold: module path -> {matrix name: per-expert pieces}.

        Empty with ``experts="convert"``, and for experts whose on-disk tensors are not one expert's rows each
        (``expert_pieces``) or not in this checkpoint.
        """
        if self.experts == "convert":
            return {}
        prefix = f"{self.layout.layers_module}.{index}"
        banks = {}
        for name, module in self.layers[index].named_modules():
            if not banks_experts(module):
                continue
            path = f"{prefix}.{name}"
            found = {m: expert_pieces(self.model, f"{path}.{m}", tuple(module._parameters[m].shape)) for m in MATRICES}
            names = [piece.name for pieces in found.values() if pieces for own in pieces for piece in own]
            if all(found.values()) and all(n in self.reader for n in names):
                banks[path] = found
        return banks

    def materialize(self, index: int) -> torch.nn.Module:
        """Load decoder layer `index`'s weights from disk (converted to the in-memory layout; experts in a bank)."""
        banks = self.expert_banks(index)
        in_banks = {
            piece.name for found in banks.values() for pieces in found.values() for own in pieces for piece in own
        }
        self._load([name for name in self._by_layer.get(index, []) if name not in in_banks])
        return_freed_memory()
        for path, found in banks.items():
            module = self.model.get_submodule(path)
            first = found[MATRICES[0]][0][0].name
            dtype = getattr(torch, SAFETENSORS_DTYPES[self.reader.info(first).dtype])
            shapes = {m: tuple(module._parameters[m].shape) for m in MATRICES}
            resident = self.experts == "resident"
            install_bank(module, ExpertBank(self.reader, found, shapes, dtype, resident, device=self.device))
        layer = self.layers[index]
        banked = {
            f"{path}.{m}"[len(self.layout.layers_module) + len(str(index)) + 2 :] for path in banks for m in MATRICES
        }
        missing = [n for n, p in layer.named_parameters() if p.is_meta and n not in banked]
        if missing:
            raise ValueError(f"{self.reader.model_dir}: layer {index} tensors missing on disk, e.g. {missing[0]}")
        layer = self._to_device(layer)
        return_freed_memory()  # the pieces read and converted on the way
        return layer

    def _to_device(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move every materialised tensor to the work device, leaving meta parameters alone."""
        if self.device.type != "cpu":
            for sub in module.modules():
                for store in (sub._parameters, sub._buffers):
                    for name, tensor in store.items():
                        if tensor is not None and not tensor.is_meta:
                            moved = tensor.to(self.device)
                            store[name] = torch.nn.Parameter(moved, False) if name in sub._parameters else moved
        return module

    def release(self, index: int) -> None:
        """Put layer `index`'s parameters back on the meta device, freeing their memory (and its expert banks)."""
        for module in self.layers[index].modules():
            remove_bank(module)
            for name, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)
        return_freed_memory()

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last layer's output: the model's final norm, then its output head."""
        if not self.head:
            raise ValueError(f"{self.reader.model_dir}: walked without its output head (head=False): no logits")
        norm = self.base.norm
        return self.model.get_output_embeddings()(norm(hidden))
