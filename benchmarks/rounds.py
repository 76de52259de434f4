"""Ways of running the same work timed in rotated rounds, and a results run of each way with
its medians (lora_bench.py, pipeline_overlap.py)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence


def rotated_rounds(
    ways: Sequence[str], rounds: int, measure: Callable[[str], dict[str, float]]
) -> dict[str, list[dict[str, float]]]:
    """Each way's `measure` results: every way measured once first (a warm-up: first windows,
    allocations; not counted), then `rounds` rounds, each starting one way later (what runs
    before a way changes from round to round), each result printed as it comes."""
    for way in ways:
        measure(way)
    raw: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
    for round_ in range(rounds):
        shift = round_ % len(ways)
        for way in [*ways[shift:], *ways[:shift]]:
            result = measure(way)
            raw[way].append(result)
            print(way, {k: round(v, 3) for k, v in result.items()}, flush=True)
    return raw


def median_of(results: list[dict[str, float]], key: str) -> float | None:
    """The median of `key` over the results that have it, to 3 decimals (None: none has it)."""
    values = [r[key] for r in results if key in r]
    return round(statistics.median(values), 3) if values else None


def way_runs(
    raw: dict[str, list[dict[str, float]]],
    fields: Callable[[str], dict],
    medians: Sequence[str],
    versus: str,
) -> list[dict]:
    """A results run of each way of `raw` (`rotated_rounds`): its `fields(way)`, the median of
    each of `medians` (`median_of`), its raw results, and `versus`: its lm_frames_per_s over the
    first way's."""
    runs = [
        {**fields(way), **{key: median_of(results, key) for key in medians}, "raw": results}
        for way, results in raw.items()
    ]
    first = runs[0]["lm_frames_per_s"]
    for run in runs:
        run[versus] = round(run["lm_frames_per_s"] / first, 3)
    return runs
