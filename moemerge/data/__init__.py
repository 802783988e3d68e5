"""Calibration and held-out text: data sources (files, Hub datasets), samples, tokens, batches.

spec      where a domain's text comes from (a file or a Hub dataset split) and how a row
          becomes a sample (messages, text, or a template over named columns)
readers   one source -> raw samples, each remembering its file (or dataset) and line (or row)
domain    a domain's sources -> seeded calibration / held-out selection -> token ids -> batches
"""

from moemerge.data.domain import (
    DEFAULT_MAX_LENGTH,
    Batch,
    DataOptions,
    TokenizedDomain,
    batches,
    load_domain,
    pack,
)
from moemerge.data.readers import DataError, SampleSource, identity
from moemerge.data.spec import DataSpec, SpecError, parse_data_source

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "Batch",
    "DataError",
    "DataOptions",
    "DataSpec",
    "SampleSource",
    "SpecError",
    "TokenizedDomain",
    "batches",
    "identity",
    "load_domain",
    "pack",
    "parse_data_source",
]
