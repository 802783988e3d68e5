"""Stage 1: merge each tensor of the source checkpoints with a named method.

Import-light on purpose: the registry and its kernels (and torch) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moemerge.merge.registry import MergeMethod, TensorContext, get_method, method_names

__all__ = ["MergeMethod", "TensorContext", "get_method", "method_names"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from moemerge.merge import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
