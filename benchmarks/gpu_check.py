"""GPU check: every CUDA path run for real, each stage time-boxed, results saved as they finish.

    python benchmarks/gpu_check.py [--out DIR] [--stages env,install,build,correctness,fit,speed] [--quick]
                                   [--budget STAGE=S,...] [--total S] [--backbones mamba,rwkv7] [--strict]

Stages, in this order (benchmarks/README.md, "GPU check", has the budget plan):

  env          python, torch, CUDA, GPU, nvcc, triton versions
  install      pure-Python wheels from --wheels (fla-core; the CLI's omegaconf / jsonargparse when missing)
               into --site, offline: the GPU machine reaches no package index
  build        causal-conv1d and mamba-ssm compiled from their sdists for this GPU's architecture only,
               in the background while the correctness of the backbones that need neither is checked
  correctness  per backbone (one subprocess each): CUDA against the same weights on CPU in fp32 (logits,
               gradients, stepwise generation), plain and with a randomised ProSG head; bf16 autocast
               against fp32; which kernel entry points ran
  fit          ``prosg fit`` conf/experiment/sg.yaml with conf/trainer/gpu.yaml (bf16-mixed), 300 steps
  speed        B=8, L=2048, d_model 768, 24 layers (mamba-130m size): train tokens/s and generation
               ms/step, kernels against pure PyTorch, peak CUDA memory; mamba first

Every stage has a wall-clock budget; its slow work runs in subprocesses killed at that budget, so a stage that
overruns is reported as "timeout" and the next one still runs. Every record is one JSON line with a
"stage" key, printed and appended at once to OUT/gpu_check.jsonl, so a run cut short keeps what finished.

Without CUDA the GPU stages print {"stage": ..., "status": "skipped", "reason": "needs CUDA"}; with
--quick, correctness and speed still run as a CPU dry run (the "device" copy on the CPU too, tiny
sizes), which exercises this script, and build checks that the sdists unpack and patch.

Exit status: 0 when the plan ran to its end, whatever the checks found (read the "summary" line);
1 with --strict when a stage failed or timed out or a check failed (skipped stages do not count);
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import importlib.machinery
import importlib.metadata
import inspect
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

STAGES = ("env", "install", "build", "correctness", "fit", "speed")
# Seconds of wall clock per stage. One device call may run 600 s: the run stops starting work at
# --total (570 s). build runs beside the first correctness jobs, so the budgets add up to more. Its
# slowest file, a selective_scan backward, took 4 CPU minutes for sm_90 here (benchmarks/README.md).
BUDGETS = {"env": 20, "install": 40, "build": 300, "correctness": 200, "fit": 75, "speed": 170}
TOTAL_S = 570.0
# Upper bound per backbone subprocess inside a stage (first Triton compiles and autotuning included).
CHECK_CAP_S = {"rwkv7": 100.0, "mamba": 60.0}
SPEED_CAP_S = {"mamba": 75.0, "rwkv7": 50.0}
DEFAULT_CAP_S = 40.0
# Families whose CUDA path needs the compiled packages (build stage); the others are checked while it runs.
NEEDS_BUILD = {"mamba": ("causal-conv1d", "mamba-ssm")}
FIRST = ("mamba", "rwkv7")  # most valuable first: the two families with CUDA kernels

# correctness: a small model, a batch of two prompts of P tokens continued to T
CHECK = dict(B=2, T=48, P=16, vocab=64, d_model=128, n_layer=2, rank=8)
# speed: mamba-130m size; QUICK is a smoke run
FULL = dict(B=8, L=2048, d_model=768, n_layer=24, vocab=50280, train_steps=3, gen_warmup=3, gen_steps=16, slow_s=5.0)
QUICK = dict(B=2, L=64, d_model=64, n_layer=2, vocab=256, train_steps=1, gen_warmup=1, gen_steps=3, slow_s=5.0)
FIT_STEPS = {"full": 300, "quick": 10}

# Tolerances of CUDA against the same weights on CPU in fp32. TF32 is switched off for the comparison
# (cuDNN's default is on), so what is left is summation order and the kernels' own arithmetic.
TOL_FP32 = dict(atol=1e-3, rtol=1e-3)  # logits, element-wise as torch.testing.assert_close
TOL_TF32 = dict(atol=2e-2, rtol=2e-2)  # logits when fla's Triton kernel ran: its dot products are TF32
GRAD_FP32, GRAD_TF32 = 1e-3, 5e-2  # worst per-parameter ||g - g_ref|| / ||g_ref||
BF16_LOGITS = 3e-2  # ||logits - ref|| / ||ref|| under bf16 autocast, against the CPU fp32 reference
BF16_GRADS = 1e-1  # ||g - g_ref|| / ||g_ref|| over all parameters together, bf16 autocast


@dataclass(frozen=True)
class Package:
    """Something the GPU machine lacks, carried as a file in --wheels."""

    dist: str  # the name on PyPI
    module: str  # a top-level module whose presence means it is installed
    pattern: str  # its file in --wheels
    build: bool  # an sdist compiled on the GPU machine (build stage), else a pure wheel (install stage)


PACKAGES = (
    Package("fla-core", "fla", "fla_core-*.whl", False),
    Package("omegaconf", "omegaconf", "omegaconf-*.whl", False),
    Package("jsonargparse", "jsonargparse", "jsonargparse-*.whl", False),
    Package("typeshed-client", "typeshed_client", "typeshed_client-*.whl", False),
    Package("docstring-parser", "docstring_parser", "docstring_parser-*.whl", False),
    Package("einops", "einops", "einops-*.whl", False),
    Package("causal-conv1d", "causal_conv1d_cuda", "causal_conv1d-*.tar.gz", True),
    Package("mamba-ssm", "selective_scan_cuda", "mamba_ssm-*.tar.gz", True),
)


# ---- records ---------------------------------------------------------------------------------------
class Recorder:
    """Prints each record as one JSON line and appends it to the results file at once."""

    def __init__(self, path: Path, fresh: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            path.write_text("")

    def emit(self, record: dict[str, Any]) -> None:
        """One record: stdout and the results file, both flushed."""
        line = json.dumps(record, default=str)
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def tail(path: Path, lines: int = 3, since: int = 0) -> str:
    """The last lines of a log written after byte offset ``since``, joined by ' | '."""
    if not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:])


def copy_tail(src: Path, dst: Path, max_bytes: int = 64 * 1024) -> None:
    """The end of a (possibly huge) log, copied where the results travel back."""
    if src.exists():
        with src.open("rb") as f:
            f.seek(max(0, src.stat().st_size - max_bytes))
            dst.write_bytes(f.read())


# ---- time boxes ------------------------------------------------------------------------------------
LIVE: set[subprocess.Popen] = set()  # time-boxed subprocesses running now, stopped if the run itself is stopped


def kill_group(proc: subprocess.Popen) -> None:
    """End a process started in its own session and everything it started: SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def run_timeboxed(argv: list[str], timeout_s: float, *, env: dict[str, str] | None = None, cwd: Path | None = None,
                  stdout: Any = None, stderr: Any = None) -> tuple[str, float, int | None]:
    """Run argv in its own process group, killed with all its children at timeout_s -> (status, s, rc)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=stdout, stderr=stderr, start_new_session=True)
    LIVE.add(proc)
    try:
        rc = proc.wait(timeout=max(0.0, timeout_s))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return "timeout", round(time.monotonic() - t0, 1), None
    finally:
        LIVE.discard(proc)
    return ("ok" if rc == 0 else "failed"), round(time.monotonic() - t0, 1), rc


@dataclass
class Background:
    """A time-boxed process left running while other stages work (the builds)."""

    name: str
    proc: subprocess.Popen
    start: float
    deadline: float
    log: Path

    def wait(self) -> tuple[str, float]:
        """Block until it ends or its deadline passes (then kill it) -> (status, seconds since its start)."""
        try:
            rc = self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            status = "timeout"
        return status, round(time.monotonic() - self.start, 1)


def worst(statuses: list[str]) -> str:
    """One status for several: failed, then timeout, then ok."""
    for s in ("failed", "timeout"):
        if s in statuses:
            return s
    return "ok"


# ---- plan and context ------------------------------------------------------------------------------
@dataclass
class Context:
    """What every stage needs: options, paths, the recorder and the builds running in the background."""

    rec: Recorder
    cuda: bool
    quick: bool = False
    out: Path = ROOT / "runs" / "gpu_check"
    work: Path = ROOT / "runs" / "gpu_check_work"
    site: Path = ROOT / "runs" / "gpu_check_work" / "site"
    wheels: Path = HERE / "wheels"
    arch: str = "90"
    backbones: list[str] = field(default_factory=list)
    fit_trainer: str = "conf/trainer/gpu.yaml"
    fit_steps: int = FIT_STEPS["full"]
    run_deadline: float = float("inf")
    builds: dict[str, Background] = field(default_factory=dict)
    build_statuses: list[str] = field(default_factory=list)  # per package, as each is known

    def emit(self, record: dict[str, Any]) -> None:
        """Record one result."""
        self.rec.emit(record)

    def child_env(self) -> dict[str, str]:
        """Environment of every subprocess: this checkout's src and the offline site first on the path."""
        path = [str(SRC), str(self.site), os.environ.get("PYTHONPATH", "")]
        return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), PYTHONUNBUFFERED="1")

    def left(self, deadline: float) -> float:
        """Seconds until the earlier of a stage deadline and the run's."""
        return min(deadline, self.run_deadline) - time.monotonic()

    def await_builds(self) -> float:
        """Wait for the background builds, recording each outcome -> seconds spent waiting."""
        t0 = time.monotonic()
        waited = bool(self.builds)
        for name, bg in list(self.builds.items()):
            status, seconds = bg.wait()
            del self.builds[name]
            copy_tail(bg.log, self.out / bg.log.name)
            record = {"stage": "build", "package": name, "status": status, "seconds": seconds, "log": bg.log.name}
            if status != "ok":
                record["error"] = error_lines(bg.log)
            self.emit(record)
            self.build_statuses.append(status)
        if waited:
            self.emit({"stage": "build", "status": worst(self.build_statuses), "waited_s": round(time.monotonic() - t0, 1)})
        return time.monotonic() - t0

    def kill_background(self) -> None:
        """Stop builds and subprocesses still running (the run itself is being stopped)."""
        for proc in [bg.proc for bg in self.builds.values()] + list(LIVE):
            kill_group(proc)


@dataclass
class Stage:
    """A step of the plan; ``run(ctx, deadline)`` returns its status, or None when it reports itself later."""

    name: str
    budget_s: float
    needs_cuda: bool
    run: Callable[[Context, float], str | None]
    dry_run: Callable[[Context, float], str] | None = None  # what it can do without CUDA (with --quick)


def run_stages(stages: list[Stage], ctx: Context, total_s: float) -> dict[str, str]:
    """Run the plan in order, each stage inside its budget and all inside total_s -> stage -> status."""
    start = time.monotonic()
    ctx.run_deadline = start + total_s
    statuses: dict[str, str] = {}
    for st in stages:
        t0 = time.monotonic()
        left = ctx.run_deadline - t0
        if st.needs_cuda and not ctx.cuda:
            record = {"stage": st.name, "status": "skipped", "reason": "needs CUDA"}
            if st.dry_run is not None and ctx.quick:
                record["dry_run"] = guarded(st.dry_run, ctx, t0 + min(st.budget_s, left), st.name)
            ctx.emit(record)
            statuses[st.name] = "skipped"
            continue
        if left < 1:
            ctx.emit({"stage": st.name, "status": "skipped", "reason": f"the run's total budget ({total_s:.0f} s) is spent"})
            statuses[st.name] = "skipped"
            continue
        budget = min(st.budget_s, left)
        status = guarded(st.run, ctx, t0 + budget, st.name)
        if status is None:  # the build, in the background: its outcome is recorded when awaited
            statuses[st.name] = "running"
            continue
        ctx.emit({"stage": st.name, "status": status, "seconds": round(time.monotonic() - t0, 1), "budget_s": round(budget, 1)})
        statuses[st.name] = status
    if ctx.builds:  # nothing waited for them: wait now (they stop at their own deadline)
        ctx.await_builds()
    return {name: worst(ctx.build_statuses) if status == "running" else status for name, status in statuses.items()}


def guarded(fn: Callable[[Context, float], str | None], ctx: Context, deadline: float, name: str) -> str | None:
    """A stage function whose exception becomes a recorded failure instead of ending the run."""
    try:
        return fn(ctx, deadline)
    except Exception as e:  # a broken stage must not cost the stages after it
        ctx.emit({"stage": name, "event": "error", "error": f"{type(e).__name__}: {e}"[:800]})
        return "failed"


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every JSON record of a results file."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


# ---- env -------------------------------------------------------------------------------------------
def command_line(argv: list[str]) -> str | None:
    """The last line a version command prints, or None if it is not there."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    return out.splitlines()[-1] if out else ""


def version_of(dist: str) -> str | None:
    """An installed distribution's version, without importing it."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def stage_env(ctx: Context, deadline: float) -> str:
    """Versions and the device: everything a reader of the results needs to place them."""
    import torch

    rec: dict[str, Any] = {
        "stage": "env", "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(), "machine": platform.machine(),
        "triton": version_of("triton"), "nvcc": command_line(["nvcc", "--version"]),
        "ninja": command_line(["ninja", "--version"]), "site": str(ctx.site),
    }
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        rec.update(gpu=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   gpu_mem_gb=round(props.total_memory / 2**30, 1), arch=ctx.arch,
                   driver=command_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    ctx.emit(rec)
    return "ok"


# ---- install / build ---------------------------------------------------------------------------------
def importable(module: str, site: Path) -> bool:
    """Whether a top-level module can be imported with ``site`` on the path (nothing is imported)."""
    return importlib.machinery.PathFinder.find_spec(module, [str(site), *sys.path]) is not None


def inventory(ctx: Context) -> dict[str, dict[str, Any]]:
    """Per package: its file in --wheels (or None) and whether it is already importable; recorded."""
    found = {}
    for pkg in PACKAGES:
        files = sorted(ctx.wheels.glob(pkg.pattern))
        found[pkg.dist] = {"file": files[-1].name if files else None, "present": importable(pkg.module, ctx.site),
                           "build": pkg.build}
    size = sum(p.stat().st_size for p in ctx.wheels.iterdir()) if ctx.wheels.is_dir() else 0
    missing = [d for d, f in found.items() if f["file"] is None and not f["present"]]
    ctx.emit({"stage": "install", "event": "inventory", "wheels": str(ctx.wheels), "size_mb": round(size / 2**20, 2),
              "packages": found, "missing": missing,
              "hint": "run benchmarks/fetch_gpu_wheels.sh on a machine with PyPI" if missing else None})
    return found


def dry_install(ctx: Context, deadline: float) -> str:
    """Without CUDA: only the inventory (nothing is installed into a development environment)."""
    inventory(ctx)
    return "ok"


def stage_install(ctx: Context, deadline: float) -> str:
    """Pure-Python wheels into --site, offline, only those not importable already."""
    found = {d: f for d, f in inventory(ctx).items() if not f["build"]}
    todo = [d for d, f in found.items() if not f["present"] and f["file"]]
    missing = [d for d, f in found.items() if not f["present"] and not f["file"]]
    for dist in (d for d in found if d not in todo):
        ctx.emit({"stage": "install", "package": dist, "status": "missing" if dist in missing else "present"})
    status = "ok"
    if todo:
        ctx.site.mkdir(parents=True, exist_ok=True)
        log = ctx.out / "install.log"
        argv = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--upgrade",
                "--disable-pip-version-check", "--target", str(ctx.site), *(str(ctx.wheels / found[d]["file"]) for d in todo)]
        with log.open("ab") as f:
            status, seconds, _ = run_timeboxed(argv, ctx.left(deadline), stdout=f, stderr=subprocess.STDOUT)
        for dist in todo:
            ctx.emit({"stage": "install", "package": dist, "status": status, "seconds": seconds,
                      **({"error": tail(log)} if status != "ok" else {})})
    return worst([status, "failed" if missing else "ok"])


GENCODE = re.compile(r'cc_flag\.append\(\s*"(?:-gencode|arch=compute_\w+,code=(?:sm|compute)_\w+)"\s*\)')


def patch_arch(setup_py: str, arch: str) -> str:
    """setup.py of mamba-ssm / causal-conv1d with its hard-coded -gencode list cut to one architecture.

    Both append every architecture their CUDA supports (nine under CUDA 13) whatever
    TORCH_CUDA_ARCH_LIST says, since torch adds its own arch flags only when none are given: nine
    times the compile time of the one GPU the check runs on.
    """
    text, n = GENCODE.subn("pass", setup_py)
    if n == 0 or "cc_flag = []" not in text:
        raise ValueError("no hard-coded -gencode list found to cut (did the sdist's setup.py change?)")
    text = text.replace("cc_flag = []", f'cc_flag = ["-gencode", "arch=compute_{arch},code=sm_{arch}"]', 1)
    compile(text, "setup.py", "exec")  # still valid Python
    return text


def unpack_and_patch(sdist: Path, dest: Path, arch: str) -> Path:
    """Unpack an sdist under dest and patch its setup.py for one architecture -> the source directory."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        shutil.rmtree(dest / top, ignore_errors=True)
        tar.extractall(dest, filter="data")
    setup = dest / top / "setup.py"
    setup.write_text(patch_arch(setup.read_text(), arch))
    return dest / top


def build_env(ctx: Context) -> dict[str, str]:
    """Force the local compile (no wheel download), one architecture, every core for ninja."""
    arch = f"{ctx.arch[:-1]}.{ctx.arch[-1]}"
    return dict(os.environ, TORCH_CUDA_ARCH_LIST=arch, MAMBA_FORCE_BUILD="TRUE", CAUSAL_CONV1D_FORCE_BUILD="TRUE",
                MAX_JOBS=str(os.cpu_count() or 4), PIP_DISABLE_PIP_VERSION_CHECK="1")


def stage_build(ctx: Context, deadline: float) -> str | None:
    """Start the compiles of causal-conv1d and mamba-ssm side by side, in the background, boxed at deadline."""
    for pkg in (p for p in PACKAGES if p.build):
        files = sorted(ctx.wheels.glob(pkg.pattern))
        record: dict[str, Any] = {"stage": "build", "package": pkg.dist}
        if importable(pkg.module, ctx.site):  # built by an earlier run on this machine
            ctx.emit({**record, "status": "present"})
            ctx.build_statuses.append("ok")
            continue
        if not files:
            ctx.emit({**record, "status": "missing", "hint": "benchmarks/fetch_gpu_wheels.sh"})
            ctx.build_statuses.append("failed")
            continue
        try:
            source = unpack_and_patch(files[-1], ctx.work / "src", ctx.arch)
        except (ValueError, OSError, tarfile.TarError, SyntaxError) as e:  # unpatched it would compile nine archs
            ctx.emit({**record, "status": "failed", "error": f"patch: {e}"})
            ctx.build_statuses.append("failed")
            continue
        log = ctx.work / f"build_{pkg.dist}.log"
        argv = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-index", "--no-deps", "--no-compile",
                "--upgrade", "--target", str(ctx.site), "-v", str(source)]
        ctx.site.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as f:
            proc = subprocess.Popen(argv, env=build_env(ctx), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        ctx.builds[pkg.dist] = Background(pkg.dist, proc, time.monotonic(), min(deadline, ctx.run_deadline), log)
        ctx.emit({**record, "status": "started", "source": files[-1].name, "arch": ctx.arch,
                  "budget_s": round(ctx.left(deadline), 1)})
    # reported when awaited (correctness, before the families that need the build)
    return None if ctx.builds else worst(ctx.build_statuses)


def dry_build(ctx: Context, deadline: float) -> str:
    """Without CUDA: check that each sdist in --wheels unpacks and its setup.py patches (nothing compiles)."""
    statuses = []
    for pkg in (p for p in PACKAGES if p.build):
        files = sorted(ctx.wheels.glob(pkg.pattern))
        record = {"stage": "build", "package": pkg.dist, "dry_run": True}
        if not files:
            ctx.emit({**record, "status": "missing"})
            continue
        try:
            unpack_and_patch(files[-1], ctx.work / "src", ctx.arch)
            ctx.emit({**record, "status": "patch_ok", "source": files[-1].name})
            statuses.append("ok")
        except (ValueError, OSError, tarfile.TarError, SyntaxError) as e:
            ctx.emit({**record, "status": "patch_failed", "error": str(e)})
            statuses.append("failed")
    return worst(statuses)


# pip's own lines around a failed build, which say nothing of the cause
PIP_NOISE = ("subprocess-exited-with-error", "metadata-generation-failed", "originates from a subprocess",
             "Encountered error", "did not run successfully", "finished with status 'error'", "failed-wheel-build")
CAUSE = re.compile(r"^\s*[\w.]+(Error|Exception|InvalidVersion)\b|\berror\b|fatal", re.IGNORECASE)


def error_lines(log: Path, n: int = 6) -> str:
    """The lines of a build log that say what went wrong (else its last lines)."""
    if not log.exists():
        return ""
    lines = log.read_text(errors="replace").splitlines()
    bad = [ln.strip() for ln in lines if CAUSE.search(ln) and not any(x in ln for x in PIP_NOISE)]
    return " | ".join((bad or lines)[-n:])[:1500]


# ---- subprocess jobs per backbone --------------------------------------------------------------------
def ordered(names: list[str]) -> list[str]:
    """Families with CUDA kernels first (mamba, rwkv7), then the rest by name."""
    return [n for n in FIRST if n in names] + sorted(n for n in names if n not in FIRST)


def run_children(ctx: Context, kind: str, names: list[str], device: str, deadline: float, caps: dict[str, float]) -> str:
    """One subprocess per backbone (a CUDA fault or OOM stays in its own process), each boxed -> status."""
    statuses = []
    for name in names:
        left = ctx.left(deadline)
        if left < 5:
            ctx.emit({"stage": kind, "backbone": name, "status": "skipped", "reason": "stage budget spent"})
            statuses.append("timeout")
            continue
        statuses.append(run_child(ctx, kind, [name], device, min(caps.get(name, DEFAULT_CAP_S), left)))
    return worst(statuses)


def run_child(ctx: Context, kind: str, names: list[str], device: str, timeout_s: float) -> str:
    """This script as ``--child kind`` on some backbones; its stderr goes to OUT/stderr.log -> status."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--backbones", ",".join(names),
            "--device", device, "--results", str(ctx.rec.path), "--work", str(ctx.work),
            "--fit-trainer", ctx.fit_trainer, "--fit-steps", str(ctx.fit_steps)] + (["--quick"] if ctx.quick else [])
    err = ctx.out / "stderr.log"
    offset = err.stat().st_size if err.exists() else 0
    done = len(read_records(ctx.rec.path))
    with err.open("ab") as f:
        f.write(f"\n==== {kind} {','.join(names)} on {device}\n".encode())
        f.flush()
        status, seconds, rc = run_timeboxed(argv, timeout_s, env=ctx.child_env(), cwd=ROOT, stderr=f)
    record = {"stage": kind, **({"backbone": ",".join(names)} if names else {}), "status": status, "seconds": seconds,
              "budget_s": round(timeout_s, 1)}
    if status != "ok":
        record["error"] = tail(err, 3, offset)
    new = read_records(ctx.rec.path)[done:]
    checks = [r for r in new if "check" in r]
    if checks:
        record.update(checks=len(checks), checks_failed=sum(not r.get("ok") for r in checks))
    if status == "ok" and (record.get("checks_failed") or any(r.get("status") == "failed" for r in new)):
        record["status"] = status = "failed"  # a failed check or measurement, though the subprocess ran to its end
    if names or status != "ok":  # a child of the whole stage (fit) has its status in the stage's line
        ctx.emit(record)
    return status


def stage_correctness(ctx: Context, deadline: float) -> str:
    """Backbones that need no build first (beside it), then wait for the build, then the rest."""
    names = ordered(ctx.backbones)
    early = [n for n in names if n not in NEEDS_BUILD]
    status = run_children(ctx, "correctness", early, "cuda", deadline, CHECK_CAP_S)
    deadline += ctx.await_builds()  # waiting for the compile is the build's time, not this stage's
    late = [n for n in names if n in NEEDS_BUILD]
    return worst([status, run_children(ctx, "correctness", late, "cuda", deadline, CHECK_CAP_S)])


def dry_correctness(ctx: Context, deadline: float) -> str:
    """Without CUDA: the whole check on CPU against CPU, every backbone in one subprocess."""
    return run_child(ctx, "correctness", ordered(ctx.backbones), "cpu", ctx.left(deadline))


def stage_fit(ctx: Context, deadline: float) -> str:
    """``prosg fit`` in a subprocess (see child_fit); Lightning's output goes to OUT/fit.log."""
    ctx.await_builds()  # the fit's Mamba should run on the kernels if they build
    return run_child(ctx, "fit", [], "cuda" if ctx.cuda else "cpu", ctx.left(deadline))


def stage_speed(ctx: Context, deadline: float) -> str:
    """Per backbone, mamba first: train and generation speed, kernels against pure PyTorch."""
    ctx.await_builds()
    return run_children(ctx, "speed", ordered(ctx.backbones), "cuda", deadline, SPEED_CAP_S)


def dry_speed(ctx: Context, deadline: float) -> str:
    """Without CUDA: the speed harness at tiny sizes on CPU, every backbone in one subprocess."""
    return run_child(ctx, "speed", ordered(ctx.backbones), "cpu", ctx.left(deadline))


def fit_needs_cuda(trainer_yaml: str) -> bool:
    """Whether the fit's trainer config asks for a GPU."""
    import yaml

    cfg = yaml.safe_load((ROOT / trainer_yaml).read_text()) or {}
    return str(cfg.get("accelerator", "auto")).lower() in ("gpu", "cuda")


def make_plan(stages: list[str], budgets: dict[str, float], fit_trainer: str) -> list[Stage]:
    """The chosen stages in their fixed order, with their budgets."""
    table = {
        "env": (False, stage_env, None),
        "install": (True, stage_install, dry_install),
        "build": (True, stage_build, dry_build),
        "correctness": (True, stage_correctness, dry_correctness),
        "fit": (fit_needs_cuda(fit_trainer), stage_fit, None),
        "speed": (True, stage_speed, dry_speed),
    }
    return [Stage(s, budgets[s], *table[s]) for s in STAGES if s in stages]


# ---- inside the children: kernel counters ------------------------------------------------------------
class KernelCounter:
    """Counts calls of the kernel entry points the backbones dispatch to, keyed by name and input dtype.

    The entry points are wrapped where the dispatch code looks them up at call time:
    ``mamba_cuda._kernels`` (what ``load_kernels`` returns), ``wkv7.fla_kernel`` and
    ``wkv7.wkv7_chunked``; ``mamba.selective_scan_bld`` is read when a mixer is built, so
    ``install`` must run before any model exists.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def wrap(self, name: str, fn: Callable) -> Callable:
        """fn, counted under name[dtype of its first tensor argument]."""
        import torch

        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            t = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            self.counts[f"{name}[{str(t.dtype).removeprefix('torch.')}]" if t is not None else name] += 1
            return fn(*args, **kwargs)

        return counted

    def install(self) -> dict[str, Any]:
        """Wrap every entry point that can be imported -> what is available, with import errors."""
        from prosg.backbones import mamba as mamba_mod
        from prosg.backbones.kernels import mamba_cuda, wkv7

        info: dict[str, Any] = {}
        kernels = mamba_cuda.load_kernels()
        info["mamba_kernels"] = kernels is not None
        if kernels is None:
            info["mamba_import_error"] = mamba_cuda.import_error()
        else:
            mamba_cuda._kernels = type(kernels)(**{f.name: self.wrap(f"mamba.{f.name}", getattr(kernels, f.name))
                                                  for f in dataclasses.fields(kernels)})
        mamba_mod.selective_scan_bld = self.wrap("mamba.scan_pytorch", mamba_mod.selective_scan_bld)
        fla = wkv7.fla_kernel()
        info["fla_kernel"] = fla is not None
        if fla is None:
            try:  # fla_kernel() swallows the reason; ask again for the record
                from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule  # noqa: F401
            except Exception as e:
                info["fla_import_error"] = f"{type(e).__name__}: {e}"[:500]
        else:
            counted = self.wrap("rwkv7.fla_chunk_dplr", fla)
            wkv7.fla_kernel = lambda: counted
        wkv7.wkv7_chunked = self.wrap("rwkv7.wkv7_chunked", wkv7.wkv7_chunked)
        return info

    def since(self, before: Counter[str]) -> dict[str, int]:
        """Calls counted after the snapshot ``before``."""
        return dict(self.counts - before)


# ---- inside the children: correctness ----------------------------------------------------------------
def next_token_loss(logits: Any, ids: Any) -> Any:
    """Mean cross-entropy of predicting ids[:, 1:] from logits[:, :-1], in fp32."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def make_method(name: str, variant: str) -> Any:
    """A small backbone with the plain method or a ProSG head whose delta is far from zero."""
    import torch

    from prosg.backbones import build
    from prosg.methods import Plain, ProSG

    backbone = build(name, vocab_size=CHECK["vocab"], d_model=CHECK["d_model"], n_layer=CHECK["n_layer"])
    with torch.no_grad():
        # zero-initialised matrices (RWKV-7's output projections and LoRA factors) would cut whole
        # paths out of the gradients being compared
        for p in backbone.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    method = ProSG(rank=CHECK["rank"]) if variant == "sg" else Plain()
    method.attach(backbone)
    if variant == "sg":  # a fresh head is exactly zero by design (as in tests/test_methods.py)
        with torch.no_grad():
            for p in method.head.grad_out.parameters():
                p.normal_(0, 0.2)
            method.head.eta.fill_(3.0)
    return method.eval()


def named_params(method: Any) -> dict[str, Any]:
    """The backbone's parameters and the method's own (a method does not register its backbone)."""
    return {**dict(method.backbone.named_parameters(prefix="backbone")), **dict(method.named_parameters(prefix="method"))}


def forward_backward(method: Any, batch: dict, amp: Callable[[], Any], **fwd: Any) -> tuple[Any, dict[str, Any]]:
    """Teacher-forced logits and the gradients of the next-token loss (fp32 copies on the CPU)."""
    params = named_params(method)
    for p in params.values():
        p.grad = None
    with amp():
        logits = method.backbone(batch["input_ids"], **fwd).logits if fwd else method(batch).logits
        loss = next_token_loss(logits, batch["input_ids"])
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in params.items() if p.grad is not None}
    return logits.detach().float().cpu(), grads


def stepwise(method: Any, ids: Any, P: int, amp: Callable[[], Any]) -> Any:
    """Generation's logits: the method reads the prompt ids[:, :P], then one step per later token."""
    import torch

    with torch.no_grad(), amp(), method.prefill(ids[:, :P]) as out:
        logits, state = [out.logits], out.state
        for t in range(P, ids.shape[1] - 1):
            o = method.backbone.step(ids[:, t], state)
            logits.append(o.logits)
            state = o.state
    return torch.stack(logits, 1).float().cpu()


def rel_err(a: Any, b: Any) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def close(a: Any, b: Any, atol: float, rtol: float) -> dict[str, Any]:
    """Element-wise comparison as torch.testing.assert_close, with the errors for the record."""
    import torch

    err = (a - b).abs()
    ok = bool(torch.isfinite(a).all()) and bool((err <= atol + rtol * b.abs()).all())
    return {"ok": ok, "max_abs_err": float(err.max()), "rel_err": rel_err(a, b), "tol": {"atol": atol, "rtol": rtol}}


def grads_close(g: dict[str, Any], ref: dict[str, Any], tol: float) -> dict[str, Any]:
    """Worst per-parameter relative error among parameters whose gradient is not negligible."""
    import torch

    if set(g) != set(ref):
        return {"ok": False, "error": f"gradients differ in which parameters get one: {sorted(set(g) ^ set(ref))[:5]}"}
    norms = {n: float(r.norm()) for n, r in ref.items()}
    floor = 1e-4 * max(norms.values(), default=0.0)  # below this a relative error is noise
    errs = {n: float((g[n] - ref[n]).norm()) / norms[n] for n in ref if norms[n] > floor}
    name = max(errs, key=errs.get) if errs else None
    finite = all(bool(torch.isfinite(t).all()) for t in g.values())
    total = rel_err(torch.cat([g[n].flatten() for n in ref]), torch.cat([ref[n].flatten() for n in ref])) if ref else 0.0
    return {"ok": finite and (name is None or errs[name] < tol), "worst_param": name,
            "worst_rel_err": errs[name] if name else 0.0, "rel_err": total, "tol": {"rel": tol}}


def check_backbone(name: str, variant: str, device: str, counter: KernelCounter) -> Iterator[dict[str, Any]]:
    """Every check of one backbone and method variant, device copy against the CPU fp32 original."""
    import torch

    torch.manual_seed(0)
    ref = make_method(name, variant)
    dev = copy.deepcopy(ref)  # one deepcopy: the head's references to the backbone's linears follow it
    dev.to(device)
    dev.backbone.to(device)
    B, T, P = CHECK["B"], CHECK["T"], CHECK["P"]
    ids = torch.randint(1, CHECK["vocab"], (B, T), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "prompt_len": torch.full((B,), P)}
    dbatch = {k: v.to(device) for k, v in batch.items()}
    fp32 = contextlib.nullcontext
    bf16 = functools.partial(torch.autocast, device_type=torch.device(device).type, dtype=torch.bfloat16)
    base = {"stage": "correctness", "backbone": name, "method": variant, "device": device}
    ref_logits, ref_grads = forward_backward(ref, batch, fp32)
    ref_steps = stepwise(ref, ids, P, fp32)

    def check(label: str, compute: Callable[[], Any], judge: Callable[[Any, bool], dict[str, Any]]) -> dict[str, Any]:
        before = counter.counts.copy()
        try:
            result = compute()
            kernels = counter.since(before)
            tf32 = any(k.startswith("rwkv7.fla") for k in kernels)  # fla's Triton dot products run in TF32
            record = judge(result, tf32)
        except Exception as e:  # one broken path must not hide the others
            kernels, record = counter.since(before), {"ok": False, "error": f"{type(e).__name__}: {e}"[:800]}
        return {**base, "check": label, **record, "kernels": kernels}

    logits_tol = lambda tf32: TOL_TF32 if tf32 else TOL_FP32  # noqa: E731
    fb = lambda amp, **kw: lambda: forward_backward(dev, dbatch, amp, **kw)  # noqa: E731
    yield check("forward_fp32", fb(fp32), lambda r, tf32: close(r[0], ref_logits, **logits_tol(tf32)))
    yield check("grads_fp32", fb(fp32), lambda r, tf32: grads_close(r[1], ref_grads, GRAD_TF32 if tf32 else GRAD_FP32))
    yield check("generate_fp32", lambda: stepwise(dev, dbatch["input_ids"], P, fp32),
                lambda r, tf32: close(r, ref_steps, **logits_tol(tf32)))
    if variant == "plain" and "return_state" in inspect.signature(type(dev.backbone).forward).parameters:
        # Mamba without a state to return and no hooks: the fused mamba_inner_fn path
        yield check("forward_fused_fp32", fb(fp32, return_state=False),
                    lambda r, tf32: with_grads(close(r[0], ref_logits, **logits_tol(tf32)),
                                               grads_close(r[1], ref_grads, GRAD_TF32 if tf32 else GRAD_FP32)))
    yield check("forward_bf16", fb(bf16),
                lambda r, _: with_grads(bf16_judge(r[0], ref_logits, BF16_LOGITS), bf16_judge_grads(r[1], ref_grads)))
    yield check("generate_bf16", lambda: stepwise(dev, dbatch["input_ids"], P, bf16),
                lambda r, _: bf16_judge(r, ref_steps, BF16_LOGITS))


def with_grads(logits: dict[str, Any], grads: dict[str, Any]) -> dict[str, Any]:
    """One record for a forward and its backward: ok when both are."""
    return {**logits, "grads": grads, "ok": logits["ok"] and grads["ok"]}


def bf16_judge(x: Any, ref: Any, tol: float) -> dict[str, Any]:
    """bf16 against fp32: one relative error over the whole tensor."""
    import torch

    err = rel_err(x, ref)
    return {"ok": bool(torch.isfinite(x).all()) and err < tol, "rel_err": err, "tol": {"rel": tol}}


def bf16_judge_grads(g: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """bf16 gradients against fp32, all parameters as one vector."""
    import torch

    names = sorted(set(g) & set(ref))
    flat = lambda d: torch.cat([d[n].flatten() for n in names])  # noqa: E731
    return bf16_judge(flat(g), flat(ref), BF16_GRADS) if names else {"ok": False, "error": "no gradients"}


def child_correctness(names: list[str], device: str, rec: Recorder) -> None:
    """Correctness of each backbone, plain and with the SG head; one record per check."""
    import torch

    # tiny CPU work: one thread, since on a busy machine a multi-threaded op waits for descheduled workers
    torch.set_num_threads(1)
    # the comparison is against fp32 on CPU: no TF32 in matmuls or cuDNN on the device side
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    counter = KernelCounter()
    rec.emit({"stage": "correctness", "event": "kernels", "device": device, **counter.install()})
    for name in names:
        for variant in ("plain", "sg"):
            try:
                for record in check_backbone(name, variant, device, counter):
                    rec.emit(record)
            except Exception as e:  # the model itself did not build or run on the CPU
                rec.emit({"stage": "correctness", "backbone": name, "method": variant, "check": "setup", "ok": False,
                          "error": f"{type(e).__name__}: {e}"[:800]})


# ---- inside the children: speed ------------------------------------------------------------------------
def speed_variants(name: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, build kwargs, forward kwargs): kernels (fused too where the forward can skip the state), pure."""
    from prosg.backbones import BACKBONES

    cls = BACKBONES[name]
    if "use_kernels" not in inspect.signature(cls.__init__).parameters:
        return [("pytorch", {}, {})]
    variants = [("kernels", {"use_kernels": True}, {})]
    if "return_state" in inspect.signature(cls.forward).parameters:
        variants.append(("kernels_fused", {"use_kernels": True}, {"return_state": False}))
    return variants + [("pytorch", {"use_kernels": False}, {})]


def sync(device: str) -> None:
    """Wait for queued CUDA work, so wall clock measures it."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peak_gb(device: str) -> float | None:
    """Peak CUDA memory since the last reset, GiB."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def reset_peak(device: str) -> None:
    """Start a new peak-memory window."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def time_train(model: Any, s: dict[str, Any], device: str, amp: Callable[[], Any], fwd: dict[str, Any]) -> dict[str, Any]:
    """Forward + backward of the next-token loss: one warm-up step, then the median of a few."""
    import torch

    ids = torch.randint(0, s["vocab"], (s["B"], s["L"]), device=device)
    params = list(model.parameters())

    def step() -> float:
        for p in params:
            p.grad = None
        sync(device)
        t0 = time.perf_counter()
        with amp():
            loss = next_token_loss(model(ids, **fwd).logits, ids)
        loss.backward()
        sync(device)
        return time.perf_counter() - t0

    reset_peak(device)
    warm = step()
    # a slow configuration (the pure-PyTorch scan at full size) gets one timed step, not three
    times = [step() for _ in range(1 if warm > s["slow_s"] else s["train_steps"])]
    sec = statistics.median(times)
    return {"tokens_per_s": round(s["B"] * s["L"] / sec, 1), "s_per_step": round(sec, 4), "warmup_s": round(warm, 3),
            "steps": len(times), "peak_mem_gb": peak_gb(device)}


def time_generate(model: Any, s: dict[str, Any], device: str, amp: Callable[[], Any]) -> dict[str, Any]:
    """Prefill B prompts of L tokens, then greedy steps: the median time of one step (B new tokens)."""
    import torch

    prompt = torch.randint(0, s["vocab"], (s["B"], s["L"]), device=device)
    reset_peak(device)
    with torch.no_grad(), amp():
        sync(device)
        t0 = time.perf_counter()
        out = model(prompt)
        sync(device)
        prefill = time.perf_counter() - t0
        state, tok = out.state, out.logits[:, -1].argmax(-1)
        times = []
        for i in range(s["gen_warmup"] + s["gen_steps"]):
            sync(device)
            t0 = time.perf_counter()
            o = model.step(tok, state)
            sync(device)
            if i >= s["gen_warmup"]:
                times.append(time.perf_counter() - t0)
            state, tok = o.state, o.logits.argmax(-1)
    ms = 1000 * statistics.median(times)
    return {"ms_per_step": round(ms, 3), "tokens_per_s": round(s["B"] * 1000 / ms, 1), "prefill_s": round(prefill, 3),
            "steps": len(times), "peak_mem_gb": peak_gb(device)}


def child_speed(names: list[str], device: str, rec: Recorder, quick: bool) -> None:
    """Train and generation speed per backbone and variant; an OOM or error is recorded and the next runs."""
    import torch

    from prosg.backbones import build
    from prosg.errors import ConfigError

    s = QUICK if quick else FULL
    counter = KernelCounter()
    counter.install()
    cuda = device == "cuda"
    if not cuda:  # the CPU dry run: one thread, as in child_correctness
        torch.set_num_threads(1)
    amp = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext
    sizes = {k: s[k] for k in ("B", "L", "d_model", "n_layer", "vocab")}
    for name in names:
        for label, build_kw, fwd in speed_variants(name):
            base = {"stage": "speed", "backbone": name, "variant": label, **sizes,
                    "dtype": "bf16-autocast" if cuda else "fp32", "device": device}
            try:
                torch.manual_seed(0)
                with torch.device(device):  # initialise on the GPU: 24 layers of orthogonal init are slow on CPU
                    model = build(name, vocab_size=s["vocab"], d_model=s["d_model"], n_layer=s["n_layer"], **build_kw)
                model.to(device)
            except ConfigError as e:  # e.g. use_kernels=True where the kernels are not importable
                rec.emit({**base, "status": "skipped", "reason": str(e)[:300]})
                continue
            except Exception as e:  # an OOM or a CUDA error while building: the next variant still runs
                rec.emit({**base, "status": "failed", "error": f"{type(e).__name__}: {e}"[:500]})
                continue
            for bench in ("train", "generate") if not fwd else ("train",):  # fused differs only in training
                before = counter.counts.copy()
                try:
                    if bench == "train":
                        record = {"status": "ok", **time_train(model.train(), s, device, amp, fwd)}
                    else:
                        model.zero_grad(set_to_none=True)  # the train step's gradients are not generation's memory
                        record = {"status": "ok", **time_generate(model.eval(), s, device, amp)}
                except torch.cuda.OutOfMemoryError as e:
                    record = {"status": "oom", "error": str(e).splitlines()[0][:300], "peak_mem_gb": peak_gb(device)}
                except Exception as e:
                    record = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}
                rec.emit({**base, "bench": bench, **record, "kernels": counter.since(before)})
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            del model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()


# ---- inside the children: fit ---------------------------------------------------------------------------
def fit_args(trainer: str, steps: int) -> list[str]:
    """``prosg fit`` arguments: the SG experiment on the given trainer, validating once at the end."""
    return ["--config", "conf/experiment/sg.yaml", "--trainer", trainer, f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={steps}", "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false", "--trainer.devices=1"]


def child_fit(rec: Recorder, work: Path, trainer: str, steps: int, log: Path, device: str) -> None:
    """Train through the CLI's own path (resolve_config + LightningCLI), timing steps and probing dtypes."""
    import torch

    from prosg.module import ProSGModule
    from prosg.train import lightning_main, resolve_config

    if device == "cpu":  # a CPU dry run: one thread, as in child_correctness
        torch.set_num_threads(1)
    counter = KernelCounter()
    counter.install()
    probe: dict[str, Any] = {"calls": 0}
    step, forward = ProSGModule.training_step, ProSGModule.forward

    def timed_step(self: Any, batch: dict, batch_idx: int) -> Any:
        probe.setdefault("first", time.perf_counter())
        probe["last"], probe["calls"] = time.perf_counter(), probe["calls"] + 1
        return step(self, batch, batch_idx)

    def probed_forward(self: Any, batch: dict) -> Any:
        out = forward(self, batch)
        if self.training:  # bfloat16 logits in training prove that autocast ran
            probe.setdefault("logits_dtype", str(out.logits.dtype).removeprefix("torch."))
        return out

    ProSGModule.training_step, ProSGModule.forward = timed_step, probed_forward
    run_dir = work / "fit"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    args = fit_args(trainer, steps)
    t0 = time.perf_counter()
    with log.open("a") as f, contextlib.redirect_stdout(f):
        cli = lightning_main(["fit", "--config", resolve_config(args, run_dir)])
    timed = probe["calls"] - 1  # steps between the first and the last call: compile and data setup excluded
    # NaN (an empty distance bucket) is no JSON: None instead
    metrics = {k: round(float(v), 4) if v.isfinite() else None for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    rec.emit({"stage": "fit", "args": args, "steps": cli.trainer.global_step, "wall_s": round(time.perf_counter() - t0, 1),
              "steps_per_s": round(timed / (probe["last"] - probe["first"]), 2) if timed > 0 else None,
              "final_loss": metrics.get("train/loss"), "precision": str(cli.trainer.precision),
              "logits_dtype": probe.get("logits_dtype"), "bf16_ran": probe.get("logits_dtype") == "bfloat16",
              "val": {k: v for k, v in metrics.items() if k.startswith("val")}, "kernels": dict(counter.counts),
              "log": log.name})


# ---- entry points -------------------------------------------------------------------------------------
def parse_budgets(text: str) -> dict[str, float]:
    """'build=200,speed=120' -> the default budgets with those replaced."""
    budgets = dict(BUDGETS)
    for item in filter(None, (t.strip() for t in text.split(","))):
        stage, _, seconds = item.partition("=")
        if stage not in budgets or not re.fullmatch(r"\d+(\.\d+)?", seconds):
            raise argparse.ArgumentTypeError(f"--budget takes STAGE=SECONDS with STAGE one of {', '.join(STAGES)}; got {item!r}")
        budgets[stage] = float(seconds)
    return budgets


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Options of the check (and of its children)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="results folder (default: $OUT if set, else runs/gpu_check)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of %(default)s")
    p.add_argument("--budget", type=parse_budgets, default=dict(BUDGETS),
                   help="seconds per stage, e.g. build=200,speed=120 (defaults: "
                        + ", ".join(f"{k}={v:.0f}" for k, v in BUDGETS.items()) + ")")
    p.add_argument("--total", type=float, default=TOTAL_S, help="no stage starts after this many seconds (%(default)s)")
    p.add_argument("--quick", action="store_true", help="smoke sizes; without CUDA also the CPU dry runs")
    p.add_argument("--backbones", default="", help="comma-separated families (default: every registered one)")
    p.add_argument("--wheels", default=str(HERE / "wheels"), help="wheels and sdists carried over (%(default)s)")
    p.add_argument("--work", default=str(ROOT / "runs" / "gpu_check_work"), help="build trees, the offline site, fit runs")
    p.add_argument("--site", help="where packages are installed (default: WORK/site)")
    p.add_argument("--arch", help="CUDA architecture to compile for, e.g. 90 (default: this GPU's)")
    p.add_argument("--fit-trainer", default="conf/trainer/gpu.yaml", help="trainer config of the fit stage")
    p.add_argument("--fit-steps", type=int, help=f"fit steps (default {FIT_STEPS['full']}, --quick {FIT_STEPS['quick']})")
    p.add_argument("--append", action="store_true", help="append to the results file instead of starting it afresh")
    p.add_argument("--strict", action="store_true", help="exit 1 if a stage failed or timed out or a check failed")
    p.add_argument("--child", choices=("correctness", "speed", "fit"), help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        p.error(f"--stages: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    if args.fit_steps is None:
        args.fit_steps = FIT_STEPS["quick" if args.quick else "full"]
    return args


def child_main(args: argparse.Namespace) -> int:
    """A subprocess of the check: one kind of work, records appended to --results."""
    rec = Recorder(Path(args.results))
    names = [n for n in args.backbones.split(",") if n]
    if args.child == "correctness":
        child_correctness(names, args.device, rec)
    elif args.child == "speed":
        child_speed(names, args.device, rec, args.quick)
    else:
        child_fit(rec, Path(args.work), args.fit_trainer, args.fit_steps, Path(args.results).parent / "fit.log", args.device)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the plan; see the module docstring for stages, records and exit status."""
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    import torch

    from prosg.backbones import BACKBONES

    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / "gpu_check")
    cuda = torch.cuda.is_available()
    work = Path(args.work)
    arch = args.arch or ("".join(map(str, torch.cuda.get_device_capability(0))) if cuda else "90")
    wanted = [n for n in args.backbones.split(",") if n] or sorted(BACKBONES)
    unknown = set(wanted) - set(BACKBONES)
    if unknown:
        print(f"gpu_check: unknown backbones {sorted(unknown)}; registered: {sorted(BACKBONES)}", file=sys.stderr)
        return 2
    ctx = Context(Recorder(out / "gpu_check.jsonl", fresh=not args.append), cuda, args.quick, out, work,
                  Path(args.site) if args.site else work / "site", Path(args.wheels), arch, wanted,
                  args.fit_trainer, args.fit_steps)
    work.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args.stages.split(","), args.budget, args.fit_trainer)
    ctx.emit({"stage": "plan", "cuda": cuda, "quick": args.quick, "out": str(out), "total_budget_s": args.total,
              "backbones": ordered(wanted), "steps": [
                  {"stage": s.name, "budget_s": s.budget_s, "needs_cuda": s.needs_cuda,
                   "runs": "yes" if cuda or not s.needs_cuda else ("dry run" if s.dry_run and args.quick else "skipped")}
                  for s in plan]})
    gpu = [s.name for s in plan if s.needs_cuda]
    if not cuda and gpu:
        message = (f"CUDA is not available here: the GPU stages ({', '.join(gpu)}) are skipped"
                   + (" (CPU dry runs where possible)" if args.quick else "")
                   + "; run this on a CUDA machine (benchmarks/README.md, 'GPU check')")
        ctx.emit({"stage": "notice", "message": message})
        print(f"gpu_check: {message}", file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below stops the builds
    t0 = time.monotonic()
    try:
        statuses = run_stages(plan, ctx, args.total)
    finally:
        ctx.kill_background()
    records = read_records(ctx.rec.path)
    failed = [f"{r['backbone']}/{r['method']}/{r['check']}" for r in records if "check" in r and not r.get("ok")]
    ctx.emit({"stage": "summary", "statuses": statuses, "checks": sum("check" in r for r in records),
              "checks_failed": failed, "wall_s": round(time.monotonic() - t0, 1), "results": str(ctx.rec.path)})
    bad = failed or any(s in ("failed", "timeout") for s in statuses.values())
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    sys.exit(main())
