"""``prosg sweep``: a grid of experiment overrides x seeds, run locally or with submitit, then collected.

- ``spec``: the sweep file format (documented there), ``load_sweep``, ``expand`` into ``Run``s, ``select``;
- ``runner``: run directories, ``status.json``, resume, one run (``run_one`` in-process, ``execute_run``
  in a child process ``python -m prosg.sweep --run-one DIR``), DDP ranks;
- ``launchers``: the ``local`` and ``submitit`` launchers and ``launch`` (prepare, skip done runs, run the rest);
- ``report``: ``collect`` into results.csv, results.md and plots;
- ``cli``: the ``prosg sweep`` command line (``main``).

Metric keys and statistics over seeds come from ``prosg.results``; training from ``prosg.train``.
"""

from prosg.sweep.cli import main
from prosg.sweep.launchers import launch, launch_local, launch_submitit, submitit_parameters
from prosg.sweep.report import Collected, collect
from prosg.sweep.runner import execute_run, prepare, read_status, run_one
from prosg.sweep.spec import Axis, Run, Sweep, expand, format_value, load_sweep, select

__all__ = [
    "Axis", "Collected", "Run", "Sweep", "collect", "execute_run", "expand", "format_value", "launch", "launch_local",
    "launch_submitit", "load_sweep", "main", "prepare", "read_status", "run_one", "select", "submitit_parameters",
]
