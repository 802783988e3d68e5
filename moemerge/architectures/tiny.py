"""Tiny random models of every supported family, for tests, benchmarks and the offline demo.

Weights cannot be downloaded here, so moemerge builds its own small models from each family's
transformers config: the family's defaults with every size shrunk to a few dozen units. The same
overrides work for all families because only attributes the config already has are set.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

TINY_SIZES: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 128,
    "max_position_embeddings": 128,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_num_experts": 4,
    "moe_k": 2,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "moe_layer_freq": 1,
    "sliding_window": 16,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A few-thousand-parameter config of `model_type`; `overrides` win over the tiny sizes."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    sizes = {k: v for k, v in TINY_SIZES.items() if k in defaults}
    if "kv_lora_rank" in defaults:  # multi-head latent attention: head_dim from the rope dim, no GQA
        sizes.pop("head_dim", None)
        sizes["num_key_value_heads"] = sizes["num_attention_heads"]
    return AutoConfig.for_model(model_type, **{**sizes, **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised tiny causal LM of `model_type`, with non-zero routers."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():  # some families initialise routers or biases to zero: make routing non-trivial
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.is_floating_point() and torch.count_nonzero(tensor) == 0 and "norm" not in name:
                tensor.normal_(0.0, 0.02)
    return model.eval()


TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
)


def tiny_tokenizer() -> Any:
    """A character-level tokenizer of printable ASCII (99 ids), with a chat template; no download."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def save_tiny_model(
    model_type: str, out_dir: str | Path, seed: int = 0, max_shard_size: str = "5GB", **overrides: Any
) -> Path:
    """Build a tiny model of `model_type` with its tokenizer and write it as a Hugging Face folder."""
    out_dir = Path(out_dir)
    tiny_model(model_type, seed=seed, **overrides).save_pretrained(out_dir, max_shard_size=max_shard_size)
    tiny_tokenizer().save_pretrained(out_dir)
    return out_dir
