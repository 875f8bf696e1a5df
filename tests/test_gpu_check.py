"""benchmarks/gpu_check.py on a CPU machine: it says CUDA is needed, skips the GPU stages, runs what it can
(the plan, the inventory, CPU dry runs), saves its records; its time box and setup.py patch work."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
GPU_STAGES = ("install", "build", "correctness", "fit", "speed")


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def run(tmp_path, *args, timeout=180):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--work", str(tmp_path / "work"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    saved = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    return proc, printed, saved


def test_quick_cpu_run_says_cuda_is_needed_and_saves_its_records(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the stages would really run")
    proc, printed, saved = run(tmp_path, "--quick", "--backbones", "lstm")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert printed == saved  # every record printed is in the results file
    plan = saved[0]
    assert plan["stage"] == "plan" and plan["total_budget_s"] > 0 and not plan["cuda"]
    assert [s["stage"] for s in plan["steps"]] == ["env", *GPU_STAGES]
    assert all(s["budget_s"] > 0 for s in plan["steps"])
    assert "CUDA is not available" in proc.stderr
    status = {r["stage"]: r for r in saved if "status" in r and "backbone" not in r and "package" not in r}
    for stage in GPU_STAGES:
        assert status[stage]["status"] == "skipped" and status[stage]["reason"] == "needs CUDA"
    # the CPU dry runs went through: the check ran against CPU and the speed harness measured something
    assert status["correctness"]["dry_run"] == status["speed"]["dry_run"] == "ok"
    checks = [r for r in saved if r.get("check")]
    assert {r["method"] for r in checks} == {"plain", "sg"} and all(r["ok"] for r in checks)
    assert any(r.get("bench") == "train" and r["tokens_per_s"] > 0 for r in saved)
    assert any(r.get("event") == "inventory" for r in saved)
    assert saved[-1]["stage"] == "summary" and saved[-1]["checks_failed"] == []


@pytest.mark.slow
def test_cpu_dry_runs_cover_every_backbone_and_the_fit_harness(tmp_path):
    proc, _, saved = run(tmp_path, "--quick", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    families = {r["backbone"] for r in saved if r.get("check")}
    assert {"mamba", "rwkv7", "rwkv4", "gpt", "lstm"} <= families
    assert all(r["ok"] for r in saved if r.get("check")), [r for r in saved if r.get("check") and not r["ok"]]
    # Mamba's fused path and the skipped kernel variants (no kernels importable here) are recorded
    assert any(r.get("check") == "forward_fused_fp32" for r in saved)
    assert any(r.get("variant") == "kernels" and r["status"] == "skipped" for r in saved)
    proc, _, saved = run(tmp_path, "--quick", "--stages", "fit", "--fit-trainer", "conf/trainer/debug.yaml", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fit = next(r for r in saved if r["stage"] == "fit" and "final_loss" in r)
    assert fit["steps"] > 0 and fit["final_loss"] > 0 and fit["precision"] == "32-true" and not fit["bf16_ran"]


def test_a_stage_over_its_budget_times_out_and_the_next_still_runs(tmp_path):
    gc = load()
    ctx = gc.Context(gc.Recorder(tmp_path / "r.jsonl", fresh=True), cuda=False, out=tmp_path)

    def slow(c, deadline):
        status, _, _ = gc.run_timeboxed([sys.executable, "-c", "import time; time.sleep(60)"], c.left(deadline))
        return status

    stages = [gc.Stage("slow", 1.0, False, slow), gc.Stage("next", 5.0, False, lambda c, d: "ok"),
              gc.Stage("gpu", 5.0, True, lambda c, d: "ok")]
    t0 = time.monotonic()
    statuses = gc.run_stages(stages, ctx, total_s=60)
    assert time.monotonic() - t0 < 15  # the sleeper was killed at its budget
    assert statuses == {"slow": "timeout", "next": "ok", "gpu": "skipped"}
    records = gc.read_records(tmp_path / "r.jsonl")
    assert {"stage": "gpu", "status": "skipped", "reason": "needs CUDA"} in records
    # a run past its total budget starts nothing more
    statuses = gc.run_stages([gc.Stage("slow", 5.0, False, slow), gc.Stage("next", 5.0, False, lambda c, d: "ok")], ctx, total_s=2)
    assert statuses == {"slow": "timeout", "next": "skipped"}


def test_a_stage_that_raises_is_recorded_as_failed(tmp_path):
    gc = load()
    ctx = gc.Context(gc.Recorder(tmp_path / "r.jsonl", fresh=True), cuda=True, out=tmp_path)

    def broken(c, d):
        raise RuntimeError("boom")

    assert gc.run_stages([gc.Stage("a", 5, False, broken), gc.Stage("b", 5, False, lambda c, d: "ok")], ctx, 60) == {
        "a": "failed", "b": "ok"}
    assert any(r.get("error") == "RuntimeError: boom" for r in gc.read_records(tmp_path / "r.jsonl"))


SETUP_PY = '''
cc_flag = []
if HIP_BUILD:
    cc_flag.append("-DBUILD_PYTHON_PACKAGE")
else:
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_75,code=sm_75")
    if bare_metal_version >= Version("11.8"):
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_90,code=sm_90")
    if bare_metal_version >= Version("13.0"):
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_110,code=sm_110")
'''


def test_setup_py_gencode_list_is_cut_to_one_architecture():
    gc = load()
    patched = gc.patch_arch(SETUP_PY, "90")
    assert patched.count("arch=compute_") == 1 and 'cc_flag = ["-gencode", "arch=compute_90,code=sm_90"]' in patched
    assert '"-DBUILD_PYTHON_PACKAGE"' in patched  # only the -gencode pairs go
    scope = {"HIP_BUILD": False, "bare_metal_version": 13.0, "Version": float}
    exec(patched, scope)
    assert scope["cc_flag"] == ["-gencode", "arch=compute_90,code=sm_90"]
    with pytest.raises(ValueError, match="gencode"):
        gc.patch_arch("print('nothing to patch')\n", "90")


def test_inventory_finds_carried_files_and_names_the_missing(tmp_path):
    gc = load()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "fla_core-0.6.0-py3-none-any.whl").write_bytes(b"x")
    (wheels / "mamba_ssm-2.3.2.post1.tar.gz").write_bytes(b"x")
    ctx = gc.Context(gc.Recorder(tmp_path / "r.jsonl"), cuda=False, wheels=wheels, site=tmp_path / "site")
    found = gc.inventory(ctx)
    assert found["fla-core"]["file"] == "fla_core-0.6.0-py3-none-any.whl" and found["mamba-ssm"]["build"]
    record = gc.read_records(tmp_path / "r.jsonl")[-1]
    assert "causal-conv1d" in record["missing"] and "fla-core" not in record["missing"] and record["hint"]


def test_bad_arguments_exit_2(tmp_path):
    gc = load()
    for argv in (["--budget", "warp=3"], ["--budget", "build=soon"], ["--stages", "env,teleport"]):
        with pytest.raises(SystemExit) as e:
            gc.parse_args(argv)
        assert e.value.code == 2
    assert gc.parse_args(["--budget", "build=200,speed=90.5"]).budget["speed"] == 90.5
