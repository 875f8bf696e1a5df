"""The throughput benchmarks run end to end (--quick) and print parseable JSON lines; timings are not checked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert lines and all("bench" in rec for rec in lines)
    return lines


@pytest.mark.slow
def test_train_step_benchmark_quick():
    lines = run_bench("train_step.py", "--models", "mamba", "--batch", "4")
    steps = [r for r in lines if r["bench"] == "train_step"]
    assert {(r["model"], r["size"], r["variant"]) for r in steps} == {
        ("mamba", s, v) for s in ("demo", "d256") for v in ("plain", "sg")}
    assert all(r["ms_per_step"] > 0 for r in steps)
    ratios = {r["what"]: r for r in lines if r["bench"] == "ratio"}
    for name in ("mamba_demo_sg_vs_plain_train_step", "mamba_d256_sg_vs_plain_train_step",
                 "mamba_sg_vs_bare_ms_per_token_b4"):
        r = ratios[name]
        assert 0 < r["iqr"][0] <= r["value"] <= r["iqr"][1]  # the noise band around the figure
        assert r["meets_target"] is (None if r["target"] is None else r["value"] <= r["target"])
    assert ratios["mamba_demo_sg_vs_plain_train_step"]["matmul_flops"] > 1  # the head's matmuls come on top


@pytest.mark.slow
def test_generation_benchmark_quick():
    lines = run_bench("generation.py", "--models", "rwkv7", "--batch", "1", "4")
    assert {r["batch"] for r in lines if r["bench"] == "generate_sg"} == {1, 4}
    assert [r["what"] for r in lines if r["bench"] == "ratio"] == [
        "rwkv7_sg_vs_bare_ms_per_token_b1", "rwkv7_sg_vs_bare_ms_per_token_b4"]
