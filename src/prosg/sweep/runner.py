"""One run of a sweep: its directory, ``status.json``, and fitting + testing it (``run_one``, ``execute_run``).

Each run lives in ``out_dir/<name>/``: ``run.json`` (its spec), ``overrides.yaml``, ``log.txt``
(stdout+stderr), ``status.json`` (``running|done|failed``, the error and log path on failure, wall
time), ``config.yaml`` (the full resolved LightningCLI config: ``prosg fit --config`` it to repeat
the run), ``metrics.json`` (test + val + last train metrics, axis values, seed, and ``sizes``: the
model's state / method / memory numbers per sample and trainable / total parameters; NaN is written
as null, infinities as "inf"), checkpoints and logger output (a logger with a ``save_dir`` is pointed
at the run directory, so concurrent runs never share a version folder). A run is ``fit`` then
``test`` on the same LightningCLI objects, through ``prosg.train.fit_and_test`` like ``prosg fit``,
in a child process (``python -m prosg.sweep --run-one DIR``) started in the sweep's working
directory (relative data paths keep working).

Resume: running the sweep again skips runs whose status is ``done`` and re-runs failed, interrupted or
unfinished ones (a run killed with its sweep stays ``running`` and is re-run). A re-run starts from
scratch: the earlier attempt's checkpoints, logger output, config and metrics are removed first (its
``last.ckpt`` would otherwise stay, and the new one become ``last-v1.ckpt``); the directory keeps only
``run.json``, ``overrides.yaml``, ``status.json`` and the logs. A ``done`` run whose overrides no longer
match the sweep file is an error: delete its directory or use another ``out_dir``. A failed run never
stops the others; the summary lists failures with their logs and the exit status is 1.

Interrupting a sweep (Ctrl-C, SIGTERM): ``stop_runs`` stops launching, lets each running child shut
down (Lightning's graceful KeyboardInterrupt), marks those runs ``interrupted`` and the sweep ends with
its summary; running it again resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from prosg import results
from prosg.errors import ConfigError
from prosg.train import fit_and_test, model_sizes

if TYPE_CHECKING:
    from prosg.sweep.spec import Run

# What a run directory keeps when the run starts again; everything else is the previous attempt's output.
RUN_FILES = ("run.json", "overrides.yaml", "status.json")
# Statuses of runs that did not finish; a sweep re-runs them.
INTERRUPTED, NOT_STARTED = "interrupted", "not started"

# Environment variables that are non-zero on every process but the global rank 0 (Lightning's
# re-executed DDP children, torchrun, srun tasks, submitit local tasks).
RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID")


# -- run directories -----------------------------------------------------------------------------
def now() -> str:
    """The current UTC time, ISO 8601 to the second (status.json's timestamps)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path) -> Any:
    """A JSON file's content, or None if it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: Path, obj: Any) -> None:
    """Write atomically, so a reader (or a crash) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """A run directory's ``status.json`` ({} if it has none)."""
    return read_json(Path(run_dir) / "status.json") or {}


def write_status(run_dir: Path, status: str, **fields: Any) -> dict[str, Any]:
    """Update ``status.json`` (a ``done`` run drops the fields of an earlier failure); return the record."""
    record = {**read_status(run_dir), "status": status, **fields}
    if status == "done":
        for k in ("error", "returncode", "log_tail"):
            record.pop(k, None)
    write_json(run_dir / "status.json", record)
    return record


def prepare(runs: list[Run], out_dir: Path) -> list[Path]:
    """Create each run's directory with run.json and overrides.yaml (finished runs are left untouched)."""
    dirs = []
    for run in runs:
        d = out_dir / run.name
        spec = run.spec()
        if read_status(d).get("status") == "done":
            old = read_json(d / "run.json") or {}
            if (old.get("experiment"), old.get("overrides")) != (spec["experiment"], spec["overrides"]):
                raise ConfigError(
                    f"run {run.name} in {out_dir} finished with different settings than the sweep file now gives "
                    f"(was {old.get('overrides')}, now {spec['overrides']}); delete {d} to re-run it, or set another out_dir"
                )
        else:
            d.mkdir(parents=True, exist_ok=True)
            write_json(d / "run.json", spec)
            (d / "overrides.yaml").write_text(yaml.safe_dump(run.overrides, sort_keys=False))
        dirs.append(d)
    return dirs


# -- one run ---------------------------------------------------------------------------------------
def is_rank_zero() -> bool:
    """Whether this process is the global rank 0 (or not part of a multi-process run)."""
    return all(int(os.environ.get(v) or 0) == 0 for v in RANK_VARS)


def _rank_tag() -> str:
    return "-".join(f"{v}{os.environ[v]}" for v in RANK_VARS if int(os.environ.get(v) or 0))


def _describe(e: BaseException) -> str:
    """An exception as status.json's one-line ``error``."""
    if isinstance(e, SystemExit):
        return f"exited with code {e.code}; the reason is in the log"
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


def run_one(run_dir: str | Path) -> dict[str, Any]:
    """Fit then test one prepared run in this process; rank 0 writes status.json, config.yaml, metrics.json.

    What ``python -m prosg.sweep --run-one DIR`` does. Other DDP ranks (Lightning re-executes this
    command for them) only train; every rank resolves the same config on its own, so no rank waits
    for a file another one writes.
    """
    run_dir = Path(run_dir).resolve()
    spec = read_json(run_dir / "run.json")
    if spec is None:
        raise ConfigError(f"{run_dir} has no run.json; runs are prepared by `prosg sweep <file>` (see --dry-run)")
    zero, start = is_rank_zero(), time.time()
    if zero:
        removed = clear_previous_attempt(run_dir)
        if removed:
            print(f"prosg sweep: {run_dir.name} starts again from scratch; removed the previous attempt's "
                  f"{', '.join(removed)}", flush=True)
        # a fresh record: nothing of an earlier failed attempt carries over
        write_json(run_dir / "status.json", {"status": "running", "started": now(), "host": socket.gethostname(),
                                              "pid": os.getpid()})
    try:
        cli, after_fit, after_test = fit_and_test(spec["args"], run_dir, write_config=zero, name=spec["name"],
                                                  group=spec.get("sweep"))
    except BaseException as e:
        if zero:
            status = INTERRUPTED if isinstance(e, KeyboardInterrupt) else "failed"
            write_status(run_dir, status, error=_describe(e), ended=now(), wall_s=round(time.time() - start, 2))
        raise
    wall = round(time.time() - start, 2)
    after_fit, after_test = results.json_scalars(after_fit), results.json_scalars(after_test)
    metrics = {
        "name": spec["name"], "axes": spec["axes"], "labels": spec["labels"], "seed": spec["seed"],
        "wall_s": wall, "global_step": int(cli.trainer.global_step),
        "test": results.of_split(after_test, "test"),
        "val": results.of_split(after_fit, "val"),
        "train": results.of_split(after_fit, "train"),
        "sizes": model_sizes(cli.model),
    }
    if cli.trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        write_status(run_dir, "done", ended=now(), wall_s=wall)
    return metrics


def clear_previous_attempt(run_dir: Path) -> list[str]:
    """Remove what an earlier attempt of this run left (checkpoints, logger output, config, metrics); their names."""
    removed = []
    for path in sorted(run_dir.iterdir()):
        if path.name in RUN_FILES or (path.name.startswith("log") and path.suffix == ".txt"):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(f"{path.name}/")
        else:
            path.unlink()
            removed.append(path.name)
    return removed


def child_env() -> dict[str, str]:
    """This environment, plus the directory holding ``prosg`` on PYTHONPATH (works without pip install)."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([src, *(p for p in paths if p != src)])
    env["PYTHONUNBUFFERED"] = "1"  # keep stdout and stderr interleaved in order in log.txt
    return env


def _tail(path: Path, n: int = 20) -> str:
    """The last ``n`` lines of a log ("" if there is none)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""


# The runs this process started (execute_run), so that an interrupted sweep can stop them.
_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()
_stopping = threading.Event()


def allow_runs() -> None:
    """Let ``execute_run`` start runs again (a launcher calls it first: an earlier sweep may have been stopped)."""
    _stopping.clear()


def stop_runs(grace_s: float = 10.0) -> None:
    """Start no more runs; ask the running children to stop (SIGINT) and wait for them, then kill what is left.

    A Ctrl-C in a terminal reaches the children too: each gets ``grace_s`` to shut down by itself (Lightning
    saves nothing and exits) before it is sent SIGINT, and as long again before SIGKILL.
    """
    _stopping.set()
    for sig in (None, signal.SIGINT, signal.SIGKILL):
        with _children_lock:
            alive = [p for p in _children if p.poll() is None]
        for p in alive if sig is not None else []:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
        deadline = time.time() + grace_s
        while alive and time.time() < deadline:
            alive = [p for p in alive if p.poll() is None]
            time.sleep(0.05)
        if not alive:
            return


def execute_run(run_dir: str | Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one prepared run in a child process, output in log.txt; return its final status. Never raises.

    The per-run function of both launchers (and every submitit task). Whatever the child does
    (finish, raise, segfault, get OOM-killed) ends with status.json ``done``, ``failed`` or, when the sweep
    was interrupted (``stop_runs``), ``interrupted``; a run not started by then returns ``not started``.
    """
    run_dir = Path(run_dir).resolve()
    if _stopping.is_set():
        return {"status": NOT_STARTED}
    zero, start = is_rank_zero(), time.time()
    log = run_dir / ("log.txt" if zero else f"log.{_rank_tag()}.txt")
    cmd = [sys.executable, "-m", "prosg.sweep", "--run-one", str(run_dir)]
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        with _children_lock:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**child_env(), **(env or {})})
            _children.add(proc)
        try:
            rc = proc.wait()
        finally:
            with _children_lock:
                _children.discard(proc)
    if not zero:
        return {"status": "rank>0", "returncode": rc}
    status = read_status(run_dir)
    if rc == 0 and status.get("status") == "done":
        return write_status(run_dir, "done", log=str(log))
    if _stopping.is_set():
        return write_status(run_dir, INTERRUPTED, error="interrupted with its sweep; run the sweep again to redo it",
                            returncode=rc, log=str(log), ended=now(), wall_s=round(time.time() - start, 2))
    if rc < 0:
        why = f"killed by signal {signal.Signals(-rc).name}"
    else:
        why = f"exited with code {rc}"
    error = status["error"] if status.get("status") == "failed" and status.get("error") else why
    return write_status(
        run_dir, "failed", error=error, returncode=rc, log=str(log), log_tail=_tail(log),
        ended=now(), wall_s=round(time.time() - start, 2),
    )
