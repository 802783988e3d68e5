"""The `moemerge` command: parses, calls the library, prints. Heavy imports happen inside commands.

Bad input exits with status 1 and a one-line error; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from moemerge import __version__

_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def _cmd_inspect(args: argparse.Namespace) -> None:
    from moemerge.architectures.layout import load_layout
    from moemerge.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(args.model)
    layout = load_layout(args.model)
    first = layout.moe_layers[0]
    summary = {
        "model": str(args.model),
        "family": layout.family.model_type,
        "router_kind": layout.router_kind.value,
        "layers": layout.num_layers,
        "moe_layers": [layer.index for layer in layout.moe_layers],
        "dense_layers": list(layout.dense_layers),
        "experts": first.num_experts,
        "top_k": first.top_k,
        "router_weights": [layer.router_weight for layer in layout.moe_layers],
        "router_biases": [layer.router_bias for layer in layout.moe_layers if layer.router_bias],
        "selection_biases": sorted(layout.selection_biases),
        "not_routers": list(layout.lookalikes),
        "tensors": len(reader.names()),
        "bytes": reader.total_bytes,
    }
    missing = sorted((layout.router_tensors | layout.selection_biases) - set(reader.names()))
    if missing:
        raise ValueError(f"{args.model}: router tensor {missing[0]} named by the architecture is not on disk")
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if isinstance(value, list) and len(value) > 4:
            value = f"{value[:2]} ... {value[-1:]} ({len(value)})"
        print(f"{key:<{width}}  {value}")


def _cmd_tiny(args: argparse.Namespace) -> None:
    from moemerge.architectures.tiny import save_tiny_model

    print(save_tiny_model(args.family, args.out, seed=args.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moemerge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"moemerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="show a model's MoE layout (family, layers, routers)")
    inspect.add_argument("model", help="Hugging Face model folder (safetensors)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(run=_cmd_inspect)

    tiny = commands.add_parser("tiny", help="write a tiny random model of a family (tests, demos)")
    tiny.add_argument("family", help="model_type, e.g. olmoe, qwen3_moe, deepseek_v3")
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_cmd_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    if args.debug:
        run(args)
        return 0
    try:
        run(args)
    except _USER_ERRORS as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"moemerge: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
