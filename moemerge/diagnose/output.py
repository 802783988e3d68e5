"""A report folder: report.json, report.md and the PNG plots, written atomically.

The report (diagnose/report.py) and the plots (diagnose/plots.py) each know only their own
format; this module puts both into one folder, so neither imports the other's writer.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from moemerge.diagnose.plots import write_plots
from moemerge.diagnose.report import REPORT_JSON, REPORT_MD, Report, markdown


def write_report(report: Report, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write report.json, report.md and the PNG plots to `out_dir` atomically (temporary folder, then rename)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir}: report folder exists; pass overwrite to replace it")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        plots = write_plots(report, tmp)
        (tmp / REPORT_JSON).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        (tmp / REPORT_MD).write_text(markdown(report, plots))
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
