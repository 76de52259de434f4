"""Results files: where and how a run was measured (device, versions, commit, command) and its
runs, written after every run (`ResultsFile`), read back, tabled and plotted (fields:
benchmarks/README.md)."""

from __future__ import annotations

import json
import math
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from heartmula_rt.errors import UserError
from heartmula_rt.request import FRAME_MS


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def commit() -> str | None:
    """HEAD of the checkout this package runs from, "+dirty" if tracked files changed."""
    repo = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def write_results(out_dir: Path, name: str, result: dict[str, Any]) -> Path:
    """`out_dir/{utc date}_{device}_{name}.json`, with a numbered suffix rather than overwrite."""
    stem = f"{result['date'][:10]}_{slug(result['device'])}_{slug(name)}"
    path, n = out_dir / f"{stem}.json", 1
    while True:
        try:
            with path.open("x") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
            return path
        except FileExistsError:
            n += 1
            path = out_dir / f"{stem}-{n}.json"
        except OSError as e:
            raise UserError(f"cannot write {path} ({e.strerror})") from None


class ResultsFile:
    """One results file written whole again after each run, so that a benchmark cut short (a
    timeout) still leaves every run it finished."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.out_dir, self.name = out_dir, name
        self.path: Path | None = None

    def write(self, result: dict[str, Any]) -> Path:
        if self.path is None:
            self.path = write_results(self.out_dir, self.name, result)
        else:
            part = self.path.with_name(self.path.name + ".part")
            try:
                part.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
                part.replace(self.path)  # atomic: a kill mid-write keeps the last whole file
            except OSError as e:
                raise UserError(f"cannot write {self.path} ({e.strerror})") from None
        print(f"saved {len(result['runs'])} run(s) to {self.path}", file=sys.stderr)
        return self.path


# Saves the runs measured so far (and the codec object, once measured) to the results file.
Save = Callable[[list[dict[str, Any]], dict[str, Any] | None], Path]


# Columns of the summary table: (title, run field, format).
_TABLE = (
    ("songs", "songs", "d"),
    ("frames", "frames", "d"),
    ("prefill ms", "prefill_ms", ".1f"),
    ("frames/s", "lm_frames_per_s", ".2f"),
    ("song f/s", "song_frames_per_s", ".2f"),
    ("vs 1", "batch_speedup", ".2f"),
    ("ms/frame", "ms_per_frame", ".2f"),
    ("floor ms", "floor_ms_per_frame", ".2f"),
    ("x floor", "floor_ratio", ".2f"),
    ("bytes/step", "bytes_per_frame", ".3g"),
    ("launches", "launches_per_frame", "d"),
    ("GB/s", "achieved_gbps", ".0f"),
    ("codec s", "codec_s", ".2f"),
    ("e2e RTF", "e2e_rtf", ".3f"),
    ("VRAM GiB", "peak_vram_gib", ".1f"),
    ("greedy", "greedy_agreement", ".4f"),
)


def format_table(runs: list[dict[str, Any]]) -> str:
    """One line per run: the numbers to compare at a glance ("-" where not measured)."""
    rows = [["run", *(title for title, _, _ in _TABLE)]]
    for run in runs:
        cells = ["-" if run.get(key) is None else format(run[key], spec) for _, key, spec in _TABLE]
        rows.append([run["name"], *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        " ".join(
            [row[0].ljust(widths[0])]
            + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        )
        for row in rows
    )


def read_results(path: Path) -> dict[str, Any]:
    """A results file written by `heartmula-rt bench`."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"results file {path} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror})") from None
    except ValueError:
        raise UserError(f"{path} is not a JSON file") from None
    runs = result.get("runs") if isinstance(result, dict) else None
    if not isinstance(runs, list) or not all(
        isinstance(r, dict) and {"name", "lm_frames_per_s", "e2e_rtf"} <= r.keys() for r in runs
    ):
        raise UserError(f"{path} is not a results file of heartmula-rt bench")
    return result


def plot_results(files: list[Path], png: Path) -> None:
    """Bars of LM frames/s and end-to-end RTF for every run of every results file."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    labels, fps, rtf = [], [], []
    for path in files:
        result = read_results(path)
        for run in result["runs"]:
            labels.append(f"{result.get('device', '?')} {run['name']}")
            fps.append(run["lm_frames_per_s"])
            rtf.append(math.nan if run["e2e_rtf"] is None else run["e2e_rtf"])
    fig = Figure(figsize=(12, 1.5 + 0.4 * len(labels)), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    rows = list(range(len(labels)))
    left.bar_label(left.barh(rows, fps), fmt="%.1f", padding=2)
    left.axvline(1000 / FRAME_MS, color="k", linestyle="--", linewidth=1)
    left.set(yticks=rows, yticklabels=labels, xlabel="LM frames/s (dashed: real time, 12.5)")
    left.invert_yaxis()  # first run on top
    rtf_labels = ["" if math.isnan(r) else f"{r:.3f}" for r in rtf]  # no codec: no bar
    right.bar_label(right.barh(rows, rtf), labels=rtf_labels, padding=2)
    right.axvline(1, color="k", linestyle="--", linewidth=1)
    right.set(xlabel="end-to-end RTF (below 1: faster than real time)")
    for ax in (left, right):
        ax.margins(x=0.12)  # room for the value labels
    try:
        fig.savefig(png, format="png")
    except OSError as e:
        raise UserError(f"cannot write {png} ({e.strerror})") from None


def results_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the results folder {path} ({e.strerror})") from None
    return path


def results_of(device: torch.device, model_name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A results file's object: where and how it was measured, then its runs."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": commit(),
        "command": shlex.join(sys.argv),
        "threads": torch.get_num_threads(),
        "model": model_name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": runs,
    }


