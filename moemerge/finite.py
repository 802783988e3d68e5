"""NaN and Inf are errors wherever moemerge reads, computes or writes weights and activations.

A NaN in one source's router merges silently into a NaN router; a float16 output whose merged
values exceed 65504 saves as Inf. Both give a checkpoint that loads and then produces garbage, so
every stage checks its tensors with `check_finite` and stops with a one-line error naming the
model folder (or layer) and the tensor, before anything is written.

The check is one reduction: `aminmax` propagates NaN and Inf into its result, reads the tensor
once without allocating a copy, and costs about as much as a sum. Only a failing tensor is read
again to count what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class NonFiniteError(ValueError):
    """A tensor holds NaN or Inf; the message names where it comes from."""


def describe_non_finite(tensor: torch.Tensor) -> str:
    """'3 NaN and 1 Inf of 4096 values, the first at index (2, 17)': what is wrong, for an error message."""
    import torch

    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    first = torch.nonzero(~torch.isfinite(tensor))[0].tolist() if nan + inf else []
    return f"{nan} NaN and {inf} Inf of {tensor.numel()} values, the first at index {tuple(first)}"


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite (integer and empty tensors always are); one pass, no copy."""
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite(tensor: torch.Tensor, where: str) -> None:
    """Raise `NonFiniteError` naming `where` (e.g. 'MODEL: tensor NAME') if `tensor` holds NaN or Inf."""
    if not is_finite(tensor):
        raise NonFiniteError(f"{where} has non-finite values ({describe_non_finite(tensor)})")


def check_cast(value: torch.Tensor, cast: torch.Tensor, where: str) -> None:
    """Raise unless `cast` (``value`` in a narrower dtype) is finite: name overflow apart from NaN/Inf in `value`."""
    import torch

    if is_finite(cast):
        return
    check_finite(value, where)
    largest = float(value.detach().abs().max())
    limit = torch.finfo(cast.dtype).max
    raise NonFiniteError(
        f"{where} overflows {str(cast.dtype).removeprefix('torch.')}: its largest magnitude {largest:.6g} exceeds "
        f"{limit:.6g}; use a wider output dtype (e.g. bfloat16 or float32)"
    )


def check_tensors(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """`check_finite` on each named tensor: the error says '{where} NAME has non-finite values (...)'."""
    for name, tensor in tensors.items():
        check_finite(tensor, f"{where} {name}")
