"""Launchers: run a sweep's prepared runs locally in subprocesses or as one submitit job array.

The sweep file's ``launcher`` section (``prosg sweep --launcher/--cluster`` override it):
  local     ``{name: local, jobs: 1, threads: null}``: each run is ``python -m prosg.sweep --run-one DIR``
            in a subprocess (a crash, even a segfault, is isolated and recorded), ``jobs`` at a time;
            ``threads`` sets each run's OMP_NUM_THREADS (``jobs: 2, threads: 1`` on a 2-core CPU). A run may itself use DDP: set
            ``trainer.devices``/``trainer.strategy`` in the overrides; Lightning re-executes the child.
  submitit  ``{name: submitit, cluster: slurm|local|debug|null, nodes: 1, gpus_per_node: 1,
            tasks_per_node: null, cpus_per_task: null, mem_gb: null, timeout_min: 60, partition: null,
            array_parallelism: 8, slurm: {extra sbatch options, e.g. account: abc}}``: one job array
            (``executor.map_array``) around the same per-run function as ``local``. ``cluster: null``
            picks SLURM when available; ``local``/``debug`` run the same code path on this machine
            (``local`` starts every array job at once; ``debug`` runs them one by one in-process).
            On SLURM: run ``prosg sweep conf/sweep/X.yaml --launcher submitit`` on a login node (in
            tmux: it waits for the array); ``tasks_per_node`` defaults to ``gpus_per_node`` and the
            overrides should set ``trainer.devices`` to it and ``trainer.num_nodes`` to ``nodes``, so
            Lightning's SLURMEnvironment maps the srun tasks to DDP ranks. Interrupting the waiting
            process leaves the jobs running; ``prosg sweep X.yaml --collect`` later gathers results.

Ctrl-C (or SIGTERM) during a local sweep stops it cleanly: no new run starts, the running ones shut down
and are marked ``interrupted``, and the sweep ends with its summary and tables (exit status 130); the
same command resumes it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from prosg.errors import ConfigError
from prosg.sweep.runner import (
    INTERRUPTED,
    NOT_STARTED,
    allow_runs,
    child_env,
    execute_run,
    now,
    prepare,
    read_status,
    stop_runs,
    write_status,
)

if TYPE_CHECKING:
    from prosg.sweep.spec import Run, Sweep

LAUNCHERS = ("local", "submitit")
SUBMITIT_KEYS = (
    "name", "cluster", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min",
    "partition", "array_parallelism", "slurm",
    "jobs", "threads",  # local launcher
)
CLUSTERS = ("slurm", "local", "debug")
SUBMITTED = "submitted"  # a submitit job still running when the sweep stopped waiting for it
UNFINISHED = (INTERRUPTED, NOT_STARTED, SUBMITTED)  # statuses of a launch that ended early


def check_launcher(raw: Any, path: Path) -> dict[str, Any]:
    """A sweep file's ``launcher`` section, checked, with ``name`` defaulting to ``local``."""
    launcher = dict(raw or {"name": "local"})
    launcher.setdefault("name", "local")
    if launcher["name"] not in LAUNCHERS:
        raise ConfigError(f"{path}: launcher.name={launcher['name']!r}; choose one of {', '.join(LAUNCHERS)}")
    bad = sorted(set(launcher) - set(SUBMITIT_KEYS))
    if bad:
        raise ConfigError(f"{path}: unknown launcher key(s) {bad}; valid: {', '.join(SUBMITIT_KEYS)}")
    if launcher.get("cluster") not in (None, *CLUSTERS):
        raise ConfigError(f"{path}: launcher.cluster={launcher['cluster']!r}; choose one of {CLUSTERS} or null (auto)")
    return launcher


def launch_local(run_dirs: list[Path], jobs: int = 1, threads: int | None = None) -> list[dict[str, Any]]:
    """Run the prepared runs in subprocesses, ``jobs`` at a time, with a progress bar.

    ``threads`` caps each run's intra-op threads (OMP_NUM_THREADS): small CPU models run
    fastest single-threaded, so ``jobs: 2, threads: 1`` uses two cores for two runs at once.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    bar = tqdm(total=len(run_dirs), desc="sweep", unit="run", file=sys.stderr, dynamic_ncols=True)
    n_failed = 0

    def one(d: Path) -> dict[str, Any]:
        nonlocal n_failed
        status = execute_run(d, env)
        if status.get("status") in UNFINISHED:  # the sweep is being stopped
            return status
        n_failed += status.get("status") != "done"
        bar.set_postfix_str(f"last {d.name} (failed so far: {n_failed})")
        bar.update()
        return status

    allow_runs()
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))  # the work happens in child processes
    futures = [pool.submit(one, d) for d in run_dirs]
    try:
        # SIGTERM (`kill`, a scheduler ending the job) stops the sweep like Ctrl-C, with its summary
        with _signal_handler(signal.SIGTERM, _raise_interrupt):
            results = [f.result() for f in futures]
    except KeyboardInterrupt:
        bar.clear()
        print("\nprosg sweep: interrupted; stopping the running runs (up to ~20 s) ...", file=sys.stderr)
        with _signal_handler(signal.SIGINT, signal.SIG_IGN):  # further Ctrl-C: the children shut down anyway
            stop_runs()
            pool.shutdown(wait=True, cancel_futures=True)
        results = [f.result() if f.done() and not f.cancelled() else {"status": NOT_STARTED} for f in futures]
    finally:
        bar.close()
    pool.shutdown()
    return results


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signal_handler(sig: signal.Signals, handler: Any) -> Iterator[None]:
    """``handler`` for ``sig`` within the block (only the main thread may set one; elsewhere: unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(sig, handler)
    try:
        yield
    finally:
        signal.signal(sig, old)


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """Temporarily replace ``os.environ`` (submitit passes it to the jobs it starts)."""
    old = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


def submitit_parameters(launcher: dict[str, Any], name: str) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` arguments from a sweep's ``launcher`` section."""
    gpus = int(launcher.get("gpus_per_node") or 0)
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": int(launcher.get("timeout_min", 60)),
        "nodes": int(launcher.get("nodes", 1)),
        # Lightning's SLURMEnvironment wants one task per device: tasks_per_node = trainer.devices
        "tasks_per_node": int(launcher.get("tasks_per_node") or max(1, gpus)),
    }
    if gpus:
        params["gpus_per_node"] = gpus
    for k in ("cpus_per_task", "mem_gb"):
        if launcher.get(k) is not None:
            params[k] = launcher[k]
    if launcher.get("partition") is not None:
        params["slurm_partition"] = launcher["partition"]
    if launcher.get("array_parallelism") is not None:
        params["slurm_array_parallelism"] = int(launcher["array_parallelism"])
    params.update({f"slurm_{k}": v for k, v in (launcher.get("slurm") or {}).items()})
    return params


def launch_submitit(run_dirs: list[Path], launcher: dict[str, Any], folder: Path, name: str) -> list[dict[str, Any]]:
    """One submitit job array over the prepared runs (the same per-run function as the local launcher)."""
    import submitit
    from tqdm import tqdm

    executor = submitit.AutoExecutor(folder=str(folder), cluster=launcher.get("cluster"))
    executor.update_parameters(**submitit_parameters(launcher, name))
    with _environ(child_env()):
        # pickled by reference (prosg.sweep.runner.execute_run): the jobs import it by module name
        jobs = executor.map_array(execute_run, [str(d) for d in run_dirs])
    print(f"submitted {len(jobs)} run(s) to {executor.cluster} (job {jobs[0].job_id if jobs else '-'}); "
          f"submitit logs in {folder}", file=sys.stderr)
    results = []
    with tqdm(total=len(jobs), desc="sweep", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            for job, d in zip(jobs, run_dirs):  # in submission order: the bar moves when the next one in line ends
                try:
                    results.append(job.result())
                except Exception as e:  # the job itself died: timeout, preemption, node failure
                    results.append(write_status(
                        d, "failed", error=f"submitit job {job.job_id} failed: {str(e)[-1000:]}",
                        log=str(job.paths.stderr), ended=now(),
                    ))
                bar.update(1)
        except KeyboardInterrupt:  # the jobs are the cluster's now: they go on; --collect gathers them later
            print(f"\nprosg sweep: stopped waiting; the {len(jobs) - len(results)} unfinished job(s) keep running "
                  f"(job {jobs[0].job_id}); gather them later with --collect", file=sys.stderr)
            results += [{**read_status(d), "status": SUBMITTED} for d in run_dirs[len(results):]]
    return results


# -- the sweep's runs ------------------------------------------------------------------------------
def launch(sweep: Sweep, runs: list[Run], launcher: str | None = None, cluster: str | None = None) -> list[dict]:
    """Prepare the run directories and launch every run that is not done; print and return a summary."""
    run_dirs = prepare(runs, sweep.out_dir)
    todo = [d for d in run_dirs if read_status(d).get("status") != "done"]
    skipped = len(run_dirs) - len(todo)
    settings = dict(sweep.launcher)
    if launcher is not None:
        settings["name"] = launcher
    if cluster is not None:
        settings["cluster"] = cluster
    print(f"sweep {sweep.name}: {len(runs)} run(s) in {sweep.out_dir}; {skipped} already done, "
          f"{len(todo)} to run with the {settings['name']} launcher", file=sys.stderr)
    if not todo:
        results = []
    elif settings["name"] == "submitit":
        results = launch_submitit(todo, settings, sweep.out_dir / "_submitit", sweep.name)
    else:
        results = launch_local(todo, jobs=int(settings.get("jobs", 1)), threads=settings.get("threads"))
    failed = [(d, s) for d, s in zip(todo, results) if s.get("status") not in ("done", *UNFINISHED)]
    stopped = {k: sum(s.get("status") == k for s in results) for k in UNFINISHED}
    n_done = sum(s.get("status") == "done" for s in results)
    head = f"sweep {sweep.name}: " + ("interrupted: " if any(stopped.values()) else "")
    print(head + f"{n_done} done now, {skipped} skipped (already done), {len(failed)} failed"
          + "".join(f", {n} {k}" for k, n in stopped.items() if n), file=sys.stderr)
    for d, s in failed:
        error = (s.get("error") or "unknown error").splitlines()[0]
        print(f"  FAILED {d.name}: {error}\n         log: {s.get('log', d / 'log.txt')}", file=sys.stderr)
    if any(stopped.values()):
        print(f"  run the same command again to resume: the {n_done + skipped} finished run(s) are kept, "
              "the others start from scratch", file=sys.stderr)
    return results


def was_interrupted(results: list[dict]) -> bool:
    """Whether a launch ended early (Ctrl-C / SIGTERM), leaving runs interrupted or not started."""
    return any(s.get("status") in UNFINISHED for s in results)
