"""Model card (README.md) for a moemerge output, in the Hugging Face model-card format."""

from __future__ import annotations

import yaml

from moemerge import __version__
from moemerge.checkpoint.hub import provenance


def model_card(*, recipe: str, sources: list[str], base: str | None, summary: str, results: str = "") -> str:
    """YAML front matter (tags, base models) then what was merged, how, and with which version.

    A model that came from the Hub is named by its repo id, and the Sources list gives the commit it
    was resolved to, so the merge can be reproduced.
    """
    models = ([base] if base else []) + [s for s in sources if s != base]
    front = {
        "library_name": "transformers",
        "tags": ["moemerge", "merge", "mixture-of-experts"],
        "base_model": [_name(m) for m in models],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        "# Merged Mixture-of-Experts model",
        "",
        summary,
        "",
        f"Made with moemerge {__version__}.",
        "",
        "## Sources",
        "",
        *([f"- {_source_line(base)} (base)"] if base else []),
        *(f"- {_source_line(s)}" for s in sources if s != base),
        "",
    ]
    if results:
        lines += ["## Results", "", results.rstrip(), ""]
    lines += ["## Recipe", "", "```yaml", recipe.rstrip(), "```", ""]
    return "\n".join(lines)


def _name(model: str) -> str:
    origin = provenance(model)
    return origin["repo_id"] if origin else model


def _source_line(model: str) -> str:
    origin = provenance(model)
    return f"`{origin['repo_id']}` at commit `{origin['commit']}`" if origin else f"`{model}`"
