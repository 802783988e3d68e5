"""Shared fixtures: tiny models written to temporary folders (no network, no GPU)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message=".*(generation|GenerationConfig).*")


@pytest.fixture(scope="session")
def tiny_olmoe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny OLMoE saved in two shards, so the sharded reader path is exercised."""
    from moemerge.architectures.tiny import save_tiny_model

    return save_tiny_model("olmoe", tmp_path_factory.mktemp("olmoe"), seed=1, max_shard_size="100KB")
