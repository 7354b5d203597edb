"""``raysens`` command line.

    raysens run CONFIG.yaml [--section.key=value ...]   run a job (Ray, or in-process with --cluster.use_ray=false)
    raysens sweep SWEEP.yaml [--key=value ...]           run a grid of runs in one job   (raysens.run.sweep)
    raysens report RUN_DIR ...                            HTML/Markdown report of a run   (raysens.report)
    raysens show RUN_DIR ...                              print a run's summary           (raysens.report)
    raysens compare RUN_A RUN_B ...                       compare two runs                (raysens.report)

``run`` joins the cluster named by ``--address=...`` (short for ``--cluster.address``) or
``$RAY_ADDRESS``, and starts an embedded local Ray otherwise. Overrides are dotted keys with YAML
values: ``--data.limit=100 --layers=[3,-1] --cluster.num_actors=2``. ``python jobs/run.py`` is the
same command (the form ``ray job submit -- python jobs/run.py ...`` runs).
"""

from __future__ import annotations

import sys
from typing import Sequence

USAGE = """usage: raysens run CONFIG.yaml [--section.key=value ...]
       raysens sweep SWEEP.yaml [--key=value ...] (see `raysens sweep --help`)
       raysens report|show|compare ... (see `raysens report --help`)

Run a sensitivity job described by CONFIG (YAML; see jobs/configs/). Overrides use dotted keys and
YAML values, e.g. --data.limit=100 --layers=[3,-1] --cluster.num_actors=2 --output.dir=s3://b/run.
--address=HOST:PORT joins a Ray cluster (default: $RAY_ADDRESS, else an embedded local Ray).
"""


def _errors():
    """(the errors of a bad config: exit 2, those of a failed run: exit 1): the raysens error family
    (``raysens.errors``) and the OS's (a file that cannot be read or written)."""
    from .config import ConfigError
    from .errors import RaysensError

    return ConfigError, (RaysensError, OSError)


def main_run(argv: Sequence[str], default_config: str | None = None) -> int:
    """``raysens run``: CONFIG (optional when ``default_config`` is given) then ``--key=value`` overrides."""
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    positional = [a for a in argv if not a.startswith("--")]
    if len(positional) > 1:
        print(f"raysens run: error: one CONFIG file expected, got {positional}", file=sys.stderr)
        return 2
    config_path = positional[0] if positional else default_config
    argv = [a for a in argv if a.startswith("--")]
    if config_path is None:
        print(USAGE, file=sys.stderr)
        print("raysens run: error: give a CONFIG file (e.g. jobs/configs/quickstart.yaml)", file=sys.stderr)
        return 2
    config_error, run_errors = _errors()
    try:
        from .config import load_config
        from .run.runner import run

        config = load_config(config_path, argv)
        run(config)
    except BaseException as exc:  # noqa: BLE001 - every way out ends in one line and an exit code
        return _failure("run", exc, config_error, run_errors)
    return 0


def _failure(cmd: str, exc: BaseException, config_error, run_errors) -> int:
    """One ``raysens CMD: error: …`` line (plus one saying how to resume when work was saved) and
    the exit code: 2 bad config, 1 failed run, 130 Ctrl-C, 143 SIGTERM. Anything not known is
    re-raised (a bug: its traceback is the useful report)."""
    from .run.signals import Terminated
    from .testing.faults import SimulatedInterrupt

    if isinstance(exc, config_error):
        code, msg = 2, str(exc)
    elif isinstance(exc, run_errors):
        code, msg = 1, str(exc)
    elif isinstance(exc, Terminated):
        code, msg = 143, "interrupted by SIGTERM"
    elif isinstance(exc, (KeyboardInterrupt, SimulatedInterrupt)):
        code, msg = 130, "interrupted (Ctrl-C)"
    else:
        raise exc
    print(f"raysens {cmd}: error: {' '.join(msg.split())}", file=sys.stderr)
    hint = getattr(exc, "resume_hint", None)
    if hint:
        print(f"raysens {cmd}: {hint}", file=sys.stderr)
    return code


SWEEP_USAGE = """usage: raysens sweep SWEEP.yaml [--key=value ...] [--dry-run]

Run every point of a sweep (see jobs/configs/sweep_*.yaml) in one job; rerunning with the same dir
skips finished points and resumes unfinished ones. Overrides: --dir=..., --grid.seq_lens=[16],
--corpus.samples=1000, and run-config keys applied to every point (--data.limit=100,
--cluster.num_actors=2, --address=HOST:PORT). --dry-run lists the points and exits.
"""


def main_sweep(argv: Sequence[str]) -> int:
    """``raysens sweep``: SWEEP config then ``--key=value`` overrides (``--dry-run`` lists the points)."""
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(SWEEP_USAGE)
        return 0
    dry = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    positional = [a for a in argv if not a.startswith("--")]
    if len(positional) != 1:
        print(SWEEP_USAGE, file=sys.stderr)
        print(f"raysens sweep: error: one SWEEP config file expected, got {positional}", file=sys.stderr)
        return 2
    from .run.grid import corpus_path, expand, load_sweep, with_corpus
    from .run.sweep import run_sweep

    config_error, run_errors = _errors()
    try:
        sweep = load_sweep(positional[0], [a for a in argv if a.startswith("--")])
        if dry:
            for c in expand(with_corpus(sweep, {"path": corpus_path(sweep)} if sweep.corpus else None)):
                print(f"{c.name}\tlayers={list(c.config.layers)}\t-> {c.config.output.dir}")
            return 0
        run_sweep(sweep)
    except BaseException as exc:  # noqa: BLE001 - every way out ends in one line and an exit code
        return _failure("sweep", exc, config_error, run_errors)
    return 0


def _report_command(name: str, argv: Sequence[str]) -> int:
    try:
        from . import report
    except ImportError as exc:
        print(f"raysens {name}: the reporting module (raysens.report) is not available ({exc})", file=sys.stderr)
        return 1
    if name == "show":  # --sample ID recomputes a sample: the engine lives outside raysens.report
        from .run.sample import sample_maps

        return int(report.main_show(list(argv), sample_map=sample_maps) or 0)
    return int(getattr(report, f"main_{name}")(list(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        return main_run(rest)
    if cmd == "sweep":
        return main_sweep(rest)
    if cmd in ("report", "show", "compare"):
        return _report_command(cmd, rest)
    print(f"raysens: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
