"""What the benchmark scripts share: model sizes, untrained teachers in the zoo's stored format,
peak-memory readings, and running one measurement in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TAG = "@@RESULT "  # a worker's result line on stdout

TINY_TEACHER = {"arch": "segmenter", "width": 8, "depth": 16, "expand_ratio": 3.0, "stem_stride": 2,
                "num_downsamples": 2, "num_classes": 3}
TINY_STUDENT = {"arch": "autoencoder", "width": 8, "embed_channels": 2, "expand_ratio": 3.0, "stem_stride": 2,
                "num_downsamples": 2}
# paper-sized (MIKE §4): width 16, 64→8→64, expansion 6, full resolution
PAPER_TEACHER = {"arch": "segmenter", "width": 16, "depth": 16, "expand_ratio": 6.0, "stem_stride": 1,
                 "num_downsamples": 3, "num_classes": 3}
PAPER_STUDENT = {"arch": "autoencoder", "width": 16, "depth": 8, "embed_channels": 2, "expand_ratio": 6.0,
                 "stem_stride": 1, "num_downsamples": 3}


def status_mb(field: str) -> float:
    """``VmHWM`` (peak), ``VmRSS`` or ``RssAnon`` of this process, MB. Per address space, so unlike
    ``ru_maxrss`` it cannot inherit the launching process's peak across fork/exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_teachers(root: Path, teachers: Sequence[tuple[str, str]], spec: dict[str, Any]) -> None:
    """Untrained segmenters in the zoo's stored format under ``root/<name>``, one per ``(name, task)``."""
    from mike_ray.mike.zoo import write_untrained_teachers

    write_untrained_teachers(root, teachers, spec)


def run_worker(script: str, spec: dict[str, Any], timeout: float, label: str) -> dict[str, Any]:
    """``python <script> --_worker <spec>`` in a fresh process; its last result line, parsed."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, script, "--_worker", json.dumps(spec)], capture_output=True,
                           text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{label}: no result after {timeout:.0f}s (killed)") from None
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(TAG)]
    if p.returncode != 0 or not lines:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-25:])
        raise SystemExit(f"{label}: failed (exit {p.returncode}):\n{tail}")
    print(f"  {label:<22} done in {time.perf_counter() - t0:5.1f}s", file=sys.stderr, flush=True)
    return json.loads(lines[-1][len(TAG):])
