"""What every benchmark scenario shares: machine info, a plain-text table, the JSON result file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from contextlib import contextmanager
from pathlib import Path

import torch

from afd_compile.config import cache_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
# Committed results (written by an explicit --out); a run without --out goes to RUNS_DIR, outside
# the checkout, so running a benchmark never rewrites tracked files.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUNS_DIR = cache_dir("bench")


def git_commit() -> str | None:
    """HEAD of the checkout the benchmark ran from, or None outside git / without git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict:
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def format_table(headers: list[str], rows: list[list]) -> str:
    """Plain-text table: first column left-aligned, the rest right-aligned; floats with 2 decimals."""
    cells = [[f"{v:.2f}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def write_json(result: dict, scenario: str, out: str | Path | None = None) -> Path:
    """Writes `result` to `out`, or RUNS_DIR/<scenario>.json; returns the path."""
    path = Path(out) if out else RUNS_DIR / f"{scenario}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


@contextmanager
def panels(path: Path, count: int):
    """`count` side-by-side axes to draw on; on exit, their legends and the PNG at path."""
    import matplotlib

    matplotlib.use("Agg")  # no display: benchmarks write files
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(5 * count, 4))
    yield axes
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
