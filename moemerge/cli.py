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


MAX_MEMORY_HELP = (
    "memory budget per rank of the calibration walk (stage 2, stage-1 regmean), e.g. 16GB or host=200GB,device=80GB, "
    "or unlimited; replaces the recipe's calibrate.max_memory (default: 90%% of the memory available now)"
)


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


def add_model_flags(parser: argparse.ArgumentParser, model: type, group: str) -> None:
    """One `--flag` per scalar or list field of a pydantic model (a list flag repeats), with its description as help.

    The recipe's option models are the single source of these flags, so the CLI and the YAML
    schema cannot drift apart. Values left unset keep the model's defaults.
    """
    section = parser.add_argument_group(group)
    for name, field in model.model_fields.items():
        annotation = str(field.annotation)
        if "BaseModel" in annotation or (
            isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields")
        ):
            continue
        flag = "--" + name.replace("_", "-")
        default = field.default if field.default is not None else "unset"
        help_text = f"{field.description or ''} (default: {default})"
        if field.annotation is bool:
            section.add_argument(flag, dest=f"{group}.{name}", action=argparse.BooleanOptionalAction, help=help_text)
        elif annotation.startswith("list["):
            section.add_argument(flag, dest=f"{group}.{name}", action="append", default=None, help=help_text)
        else:
            section.add_argument(flag, dest=f"{group}.{name}", type=_parse_scalar, default=None, help=help_text)


def _parse_scalar(text: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def model_values(args: argparse.Namespace, group: str) -> dict:
    """The flags of one group that the user set, as a dict for the pydantic model."""
    prefix = f"{group}."
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from moemerge.calibrate.options import CalibrationOptions
    from moemerge.calibrate.runner import Domain, calibrate

    files = _source_files(args.source, args.data)
    options = CalibrationOptions(
        harc=model_values(args, "harc"),
        data=model_values(args, "data"),
        regmean=model_values(args, "regmean"),
        **model_values(args, "run"),
    )
    domains = [Domain(source, tuple(files[source])) for source in args.source]
    out = calibrate(args.merged, domains, args.out, options, work_dir=args.work_dir, overwrite=args.overwrite)
    print(out)


def _source_files(sources: list[str], data: list[list[str]]) -> dict[str, list[str]]:
    """`--data SOURCE=FILE [FILE ...]` entries grouped by source; every source needs files, every entry a source."""
    files: dict[str, list[str]] = {}
    for entry in data:
        name, _, first = entry[0].partition("=")
        if not first:
            raise ValueError(f"--data {entry[0]}: expected SOURCE=FILE [FILE ...]")
        files.setdefault(name, []).extend([first, *entry[1:]])
    unknown = sorted(set(files) - set(sources))
    if unknown:
        raise ValueError(f"--data names {unknown[0]}, which is not one of the --source models")
    missing = [s for s in sources if s not in files]
    if missing:
        raise ValueError(f"--source {missing[0]} has no --data {missing[0]}=FILES")
    return files


def _cmd_diagnose(args: argparse.Namespace) -> None:
    from moemerge.calibrate.runner import Domain
    from moemerge.diagnose.evaluate import diagnose
    from moemerge.diagnose.options import DiagnoseOptions
    from moemerge.diagnose.report import headline_table

    files = _source_files(args.source, args.data)
    values = model_values(args, "diagnose")
    if "stage1" in values:
        values["stage1"] = str(values["stage1"])  # a folder named like a number is still a path
    options = DiagnoseOptions(data=model_values(args, "data"), **values)
    domains = [Domain(source, tuple(files[source])) for source in args.source]
    report = diagnose(args.model, domains, args.out, options, overwrite=args.overwrite, progress=not args.quiet)
    print(headline_table(report))
    print(f"report: {args.out}")


def _cmd_run(args: argparse.Namespace) -> None:
    from moemerge.pipeline.run import run_recipe

    out = run_recipe(
        args.recipe,
        args.out,
        stage1=args.stage1,
        overwrite=args.overwrite,
        progress=not args.quiet,
        max_memory=args.max_memory,
    )
    print(out)


def _cmd_tiny(args: argparse.Namespace) -> None:
    from moemerge.architectures.tiny import save_tiny_model

    print(save_tiny_model(args.family, args.out, seed=args.seed))


def _cmd_merge(args: argparse.Namespace) -> None:
    from moemerge.pipeline.stage1 import merge_checkpoints

    out = merge_checkpoints(
        args.recipe,
        args.out,
        overwrite=args.overwrite,
        device=args.device,
        max_shard_bytes=args.max_shard_size,
        progress=not args.quiet,
        max_memory=args.max_memory,
    )
    print(out)


def _add_source_flags(parser: argparse.ArgumentParser, data_help: str) -> None:
    """`--source S --data S=FILES` pairs, as `calibrate` and `diagnose` take them (see `_source_files`)."""
    parser.add_argument("--source", action="append", required=True, help="a source model: folder or Hub id")
    parser.add_argument("--data", action="append", nargs="+", required=True, metavar="SOURCE=FILE", help=data_help)


def _add_calibration_flags(parser: argparse.ArgumentParser) -> None:
    from moemerge.calibrate.options import CalibrationOptions, RegMeanOptions, RouterSolveOptions
    from moemerge.data import DataOptions

    add_model_flags(parser, RouterSolveOptions, "harc")
    add_model_flags(parser, RegMeanOptions, "regmean")
    add_model_flags(parser, DataOptions, "data")
    add_model_flags(parser, CalibrationOptions, "run")


def _add_diagnose_flags(parser: argparse.ArgumentParser) -> None:
    from moemerge.data import DataOptions
    from moemerge.diagnose.options import DiagnoseOptions

    add_model_flags(parser, DiagnoseOptions, "diagnose")
    add_model_flags(parser, DataOptions, "data")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moemerge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"moemerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="show a model's MoE layout (family, layers, routers)")
    inspect.add_argument("model", help="model folder (safetensors), or Hub id org/name[@revision]")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(run=_cmd_inspect)

    merge = commands.add_parser("merge", help="stage 1: merge the recipe's models tensor by tensor")
    merge.add_argument("recipe", help="recipe YAML (mergekit-compatible stage-1 keys)")
    merge.add_argument("-o", "--out", required=True, help="output model folder (written atomically)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    merge.add_argument("--device", default="cpu", help="cpu, or cuda to merge on the GPU when present (CPU otherwise)")
    merge.add_argument(
        "--max-shard-size", default="2GB", help="largest output shard, e.g. 2GB, 500MB, 1GiB (default 2GB)"
    )
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.add_argument("--max-memory", help=MAX_MEMORY_HELP)
    merge.set_defaults(run=_cmd_merge)

    cal = commands.add_parser("calibrate", help="stage 2: re-solve every MoE router of a merged model with HARC")
    cal.add_argument("--merged", required=True, help="the stage-1 merged model: folder or Hub id org/name[@rev]")
    _add_source_flags(
        cal,
        "a source's domain text: SOURCE=DATA [DATA ...], files (.jsonl .json .txt .parquet .csv) or Hub datasets "
        "(org/name[@rev][:config][:split], e.g. org/name:train[:2000])",
    )
    cal.add_argument("-o", "--out", required=True, help="output model folder")
    cal.add_argument("--work-dir", help="folder of finished layers, for resuming (default: OUT.work)")
    cal.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_calibration_flags(cal)
    cal.set_defaults(run=_cmd_calibrate)

    diag = commands.add_parser(
        "diagnose", help="compare models with each source on its domain's held-out text: routing, loss, plots"
    )
    diag.add_argument("--model", action="append", required=True, help="a candidate model: folder or Hub id")
    _add_source_flags(
        diag, "a source's domain text: SOURCE=DATA [DATA ...] (files or Hub datasets); evaluated on the --heldout split"
    )
    diag.add_argument("-o", "--out", required=True, help="report folder (report.json, report.md, PNG plots)")
    diag.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    diag.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_diagnose_flags(diag)
    diag.set_defaults(run=_cmd_diagnose)

    run = commands.add_parser("run", help="stage 1, stage 2 and diagnose from one recipe; report in the model card")
    run.add_argument("recipe", help="recipe YAML (merge fields plus an optional calibrate section)")
    run.add_argument("-o", "--out", required=True, help="output model folder (stage 1 goes to OUT.stage1)")
    run.add_argument("--stage1", help="start from this existing stage-1 checkpoint instead of merging")
    run.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--max-memory", help=MAX_MEMORY_HELP)
    run.set_defaults(run=_cmd_run)

    tiny = commands.add_parser("tiny", help="write a tiny random model of a family (tests, demos)")
    tiny.add_argument("family", help="model_type, e.g. olmoe, qwen3_moe, deepseek_v3")
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_cmd_tiny)
    return parser


_MODEL_FLAGS = ("model", "merged", "source", "stage1", "diagnose.stage1")
"""Flags naming a model: a local folder, or a Hub id org/name[@revision]."""


def _with_models_resolved(command: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """`command` after every model flag is resolved to a local folder, all in one plan (moemerge.checkpoint.hub):
    families and tensor shapes are compared before any weights download. `--data SOURCE=` follows its source."""

    def run(args: argparse.Namespace) -> None:
        from moemerge.checkpoint.hub import resolve_models

        given = {flag: getattr(args, flag) for flag in _MODEL_FLAGS if getattr(args, flag, None) is not None}
        given = {flag: value if isinstance(value, list) else str(value) for flag, value in given.items()}
        refs = [ref for value in given.values() for ref in ([value] if isinstance(value, str) else value)]
        if refs:
            found = resolve_models(refs, progress=not getattr(args, "quiet", False))
            for flag, value in given.items():
                setattr(args, flag, found[value] if isinstance(value, str) else [found[v] for v in value])
            if getattr(args, "data", None):
                args.data = [[_renamed(entry[0], found), *entry[1:]] for entry in args.data]
        command(args)

    return run


def _renamed(data_entry: str, found: dict[str, str]) -> str:
    source, equals, files = data_entry.partition("=")
    return f"{found.get(source, source)}{equals}{files}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = _with_models_resolved(args.run)
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
