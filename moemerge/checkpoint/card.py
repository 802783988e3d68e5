"""Model card (README.md) for a moemerge output, in the Hugging Face model-card format."""

from __future__ import annotations

import yaml

from moemerge import __version__


def model_card(*, recipe: str, sources: list[str], base: str | None, summary: str, results: str = "") -> str:
    """YAML front matter (tags, base models) then what was merged, how, and with which version."""
    front = {
        "library_name": "transformers",
        "tags": ["moemerge", "merge", "mixture-of-experts"],
        "base_model": ([base] if base else []) + [s for s in sources if s != base],
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
        *([f"- `{base}` (base)"] if base else []),
        *(f"- `{s}`" for s in sources if s != base),
        "",
    ]
    if results:
        lines += ["## Results", "", results.rstrip(), ""]
    lines += ["## Recipe", "", "```yaml", recipe.rstrip(), "```", ""]
    return "\n".join(lines)
