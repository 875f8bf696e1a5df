"""Backbone speed and memory: train step (forward + backward) and generation, one JSON line each.

    PYTHONPATH=src python benchmarks/backbones.py [--quick] [--models mamba,hf_mambapy] [--device cpu] [--threads N]

Measures every family registered in ``prosg.backbones.registry.BACKBONES`` (built generically
with ``build(name, vocab_size=..., d_model=..., n_layer=...)``) and every reference listed in
``benchmarks/ref_*.py`` (``REFERENCES``: (name, family, make_fn), where
``make_fn(our_model) -> fn(ids) -> loss`` runs on the same weights). Every measurement runs in
a fresh subprocess, so the peak RSS (``ru_maxrss``) of different models is comparable;
``step_mem_mb`` is that peak minus the RSS just before the first step (model, inputs and
imports excluded). Timings: one warm-up step, then the median of ``--steps`` steps; a reference
whose warm-up step exceeds ``--slow-s`` reports that one step. Lines:

    {"bench": "env", ...}                                      machine, threads, load average
    {"bench": "train_step", "model", "B", "L", "d_model", "n_layer", "vocab", "tokens_per_s",
     "s_per_step", "cpu_s_per_step", "steps", "peak_mem_mb", "step_mem_mb", ...}
    {"bench": "generate", "model", "prompt_len", "ms_per_token", "tokens"}
    {"bench": "ratio", "what": "<family>_train_vs_<reference>", "value"}     reference s / ours s
    {"bench": "ratio", "what": "<family>_step_mem_vs_<reference>", "value"}  ours / reference
    {"bench": "ratio", "what": "<model>_generate_<long>_vs_<short>", "value"} ms/token ratio
    {"bench": "skip" | "error", "model", "reason"}

On a shared CPU, wall times are noisy; ``cpu_s_per_step`` (process CPU time) helps to read them,
and ``--threads 1`` avoids the multi-threaded stalls an oversubscribed machine causes (a parallel
region waits for its descheduled worker), which hit many-small-op code hardest.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

FULL = dict(B=4, L=1024, d_model=256, n_layer=4, vocab=512, prompt_lens=[64, 2048], gen_tokens=64, steps=3)
QUICK = dict(B=2, L=64, d_model=64, n_layer=2, vocab=256, prompt_lens=[16, 64], gen_tokens=8, steps=2)


def emit(record: dict[str, Any]) -> None:
    """Print one JSON line, flushed so a parent process sees it at once."""
    print(json.dumps(record), flush=True)


# ---- discovery (parent) ------------------------------------------------------------------
def load_module(path: Path) -> Any:
    """Import a benchmarks/ref_*.py file by path (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def discover_references() -> tuple[dict[str, tuple[str, Path]], list[dict[str, Any]]]:
    """{reference name: (family, file)} from every ref_*.py, plus skip notes for broken files."""
    refs, notes = {}, []
    for path in sorted(HERE.glob("ref_*.py")):
        try:
            module = load_module(path)
            for name, family, _ in module.REFERENCES:
                refs[name] = (family, path)
        except Exception as e:  # a sibling family still being written must not stop the others
            notes.append({"bench": "skip", "model": path.name, "reason": f"{type(e).__name__}: {e}"})
    return refs, notes


# ---- measurements (child) ----------------------------------------------------------------
def next_token_loss(logits: Any, ids: Any) -> Any:
    """Mean cross-entropy of predicting ids[:, 1:] from logits[:, :-1]."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def current_rss_mb() -> float:
    """Resident memory now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """High-water RSS of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_train(spec: dict[str, Any], model: Any, device: str) -> dict[str, Any]:
    """Time forward + backward of the model (or of a reference on its weights)."""
    import torch

    model.train()
    if spec.get("ref_file"):
        module = load_module(Path(spec["ref_file"]))
        make = {name: make for name, _, make in module.REFERENCES}[spec["model"]]
        fn: Callable = make(model)
    else:
        fn = lambda ids: next_token_loss(model(ids).logits, ids)  # noqa: E731
    ids = torch.randint(0, spec["vocab"], (spec["B"], spec["L"]), device=device)
    params = list(model.parameters())

    def step() -> tuple[float, float]:
        for p in params:
            p.grad = None
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn(ids).backward()
        _sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    base = current_rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    first = step()
    runs = [first] if first[0] > spec["slow_s"] else [step() for _ in range(spec["steps"])]
    wall = statistics.median(r[0] for r in runs)
    record = dict(
        bench="train_step", model=spec["model"], family=spec["family"], device=device, B=spec["B"], L=spec["L"],
        d_model=spec["d_model"], n_layer=spec["n_layer"], vocab=spec["vocab"],
        tokens_per_s=round(spec["B"] * spec["L"] / wall, 1), s_per_step=round(wall, 4),
        cpu_s_per_step=round(statistics.median(r[1] for r in runs), 4), steps=len(runs),
        warmup_counted=len(runs) == 1 and runs[0] is first,
        peak_mem_mb=round(peak_rss_mb(), 1), step_mem_mb=round(peak_rss_mb() - base, 1),
        threads=torch.get_num_threads(),
    )
    if device.startswith("cuda"):
        record["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    record.update(getattr(fn, "info", {}))
    return record


def measure_generate(spec: dict[str, Any], model: Any, device: str) -> list[dict[str, Any]]:
    """ms per generated token (greedy, batch 1) after prompts of each length.

    The prompt lengths take turns token by token, so a change in machine load hits all of them
    alike and their ratio stays meaningful on a shared machine.
    """
    import torch

    model.eval()
    lens = spec["prompt_lens"]
    times: dict[int, list[float]] = {n: [] for n in lens}
    with torch.no_grad():
        runs = {}
        for n in lens:
            out = model(torch.randint(0, spec["vocab"], (1, n), device=device))
            runs[n] = (out.state, out.logits[:, -1].argmax(-1))
        for i in range(spec["gen_tokens"] + 2):  # the first two tokens are warm-up
            for n in lens:
                state, tok = runs[n]
                _sync(device)
                t0 = time.perf_counter()
                o = model.step(tok, state)
                _sync(device)
                if i >= 2:
                    times[n].append(time.perf_counter() - t0)
                runs[n] = (o.state, o.logits.argmax(-1))
    return [dict(bench="generate", model=spec["model"], device=device, prompt_len=n,
                 ms_per_token=round(1000 * statistics.median(times[n]), 3), tokens=len(times[n]),
                 d_model=spec["d_model"], n_layer=spec["n_layer"]) for n in lens]


def run_child(spec: dict[str, Any]) -> None:
    """Build the family's model and run one measurement; JSON lines on stdout."""
    import torch

    from prosg.backbones.registry import build

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = spec["device"]
    model = build(spec["family"], vocab_size=spec["vocab"], d_model=spec["d_model"], n_layer=spec["n_layer"]).to(device)
    if spec["kind"] == "train":
        emit(measure_train(spec, model, device))
    else:
        for record in measure_generate(spec, model, device):
            emit(record)


# ---- orchestration (parent) --------------------------------------------------------------
def run_job(spec: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """Run one measurement in a fresh interpreter; its JSON lines, or an error record."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p))
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [{"bench": "error", "model": spec["model"], "kind": spec["kind"], "reason": f"timed out after {timeout:.0f} s"}]
    records = []
    for line in proc.stdout.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "bench" in rec:
            records.append(rec)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        records.append({"bench": "error", "model": spec["model"], "kind": spec["kind"], "reason": tail})
    return records


def ratios(records: list[dict[str, Any]], refs: dict[str, tuple[str, Path]]) -> list[dict[str, Any]]:
    """Reference-vs-ours train ratios and long-vs-short prompt generation ratios."""
    train = {r["model"]: r for r in records if r["bench"] == "train_step"}
    out = []
    for name, (family, _) in refs.items():
        if name in train and family in train:
            ours, ref = train[family], train[name]
            out.append({"bench": "ratio", "what": f"{family}_train_vs_{name}", "value": round(ref["s_per_step"] / ours["s_per_step"], 2)})
            if ref["step_mem_mb"] > 0:
                out.append({"bench": "ratio", "what": f"{family}_step_mem_vs_{name}",
                            "value": round(ours["step_mem_mb"] / ref["step_mem_mb"], 3)})
    gen: dict[str, dict[int, float]] = {}
    for r in records:
        if r["bench"] == "generate":
            gen.setdefault(r["model"], {})[r["prompt_len"]] = r["ms_per_token"]
    for model, by_len in gen.items():
        if len(by_len) >= 2:
            lo, hi = min(by_len), max(by_len)
            out.append({"bench": "ratio", "what": f"{model}_generate_{hi}_vs_{lo}", "value": round(by_len[hi] / by_len[lo], 3)})
    return out


def main(argv: list[str] | None = None) -> None:
    import prosg.backbones  # noqa: F401  (importing the package registers every family)
    from prosg.backbones.registry import BACKBONES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    ap.add_argument("--models", default="", help=f"comma-separated families ({', '.join(sorted(BACKBONES))}) "
                    "and/or reference names from ref_*.py (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, help="timed train steps after the warm-up (median reported)")
    ap.add_argument("--seq-len", type=int, help="override L of the train step")
    ap.add_argument("--slow-s", type=float, default=20.0, help="a warm-up step slower than this is the measurement")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement subprocess")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in every measurement (default: torch's)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(json.loads(args.child))
        return

    import torch

    sizes = dict(QUICK if args.quick else FULL)
    if args.steps:
        sizes["steps"] = args.steps
    if args.seq_len:
        sizes["L"] = args.seq_len
    wanted = {m.strip() for m in args.models.split(",") if m.strip()}
    refs, notes = discover_references()
    emit({"bench": "env", "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
          "cpus": os.cpu_count(), "threads": args.threads or torch.get_num_threads(), "load_avg": [round(x, 2) for x in os.getloadavg()],
          "device": args.device, "quick": args.quick, **{k: sizes[k] for k in ("B", "L", "d_model", "n_layer", "vocab")}})
    for note in notes:
        emit(note)
    for name in sorted(wanted - set(BACKBONES) - set(refs)):
        emit({"bench": "skip", "model": name, "reason": f"not a registered family ({', '.join(sorted(BACKBONES))}) or reference"})

    base = dict(sizes, device=args.device, slow_s=args.slow_s, threads=args.threads)
    jobs = []
    for family in sorted(BACKBONES):
        if not wanted or family in wanted:
            jobs.append(dict(base, kind="train", model=family, family=family))
            jobs.append(dict(base, kind="generate", model=family, family=family))
    for name, (family, path) in refs.items():
        if wanted and name not in wanted:
            continue
        if family not in BACKBONES:
            emit({"bench": "skip", "model": name, "reason": f"its family {family!r} is not registered"})
            continue
        jobs.append(dict(base, kind="train", model=name, family=family, ref_file=str(path)))
    records = []
    for spec in jobs:
        for rec in run_job(spec, args.timeout):
            emit(rec)
            records.append(rec)
    for rec in ratios(records, refs):
        emit(rec)


if __name__ == "__main__":
    main()
