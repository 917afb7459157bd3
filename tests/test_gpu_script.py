"""benchmarks/gpu.sh: the dry run exercises every GPU figure's code path on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, tmp_path: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2", **extra_env)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.slow
def test_gpu_script_dry_run_produces_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run("--dry-run", "--out", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = proc.stdout
    for label in ("backbone batch 1:", "compiled", "analysis per view", "SAE training:",
                  "matmul peak", "extract:", "DRY RUN"):  # fmt: skip
        assert label in text, label
    figures = json.loads(out.read_text())
    assert figures["dry_run"] is True
    assert set(figures) >= {"backbone", "analysis", "sae", "extract"}
    first = figures["backbone"]["1"]
    for key in ("eager_fp32_s", "bf16_channels_last_s", "compiled_bf16_s", "bf16_speedup"):
        assert math.isfinite(first[key]) and first[key] > 0, key
    assert first["compiled_max_rel_diff"] < 0.05  # bf16: a few digits, not garbage
    assert figures["analysis"]["probability_finite"] and figures["analysis"]["ratio"] > 0
    assert figures["analysis"]["exam_per_view_s"] > 0  # four views at once (analyse_many)
    sae = figures["sae"]
    assert sae["tokens_per_s_bf16"] > 0 and sae["matmul_peak_tflops"] > 0
    assert math.isfinite(sae["loss_bf16"]) and math.isfinite(sae["loss_fp32"])
    assert figures["extract"]["images"] == 8 and figures["extract"]["ratio"] > 0


def test_gpu_script_without_a_gpu_says_so(tmp_path):
    # GPUs hidden, so the refusal is checked on every machine (no skip where one is present)
    proc = _run(tmp_path=tmp_path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr
