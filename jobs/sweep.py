"""Ray job entrypoint for sweeps: ``python jobs/sweep.py SWEEP.yaml [--key=value ...] [--dry-run]``.

The same as ``raysens sweep``. One job runs every point of the sweep (``raysens.run.sweep``); each point
writes its own run directory under the sweep's ``dir``, so rerunning the same command after a crash
skips the finished points and resumes the unfinished one from its partials.

Here (embedded local Ray, CPU):

    python jobs/sweep.py jobs/configs/sweep_tiny_10k.yaml
    python jobs/sweep.py jobs/configs/sweep_tiny_10k.yaml --corpus.samples=1000 --dir=runs/sweep-tiny-1k
    python jobs/sweep.py jobs/configs/sweep_tiny_10k.yaml --dry-run          # list the points
    raysens sweep jobs/configs/sweep_tiny_10k.yaml                           # the same, via the CLI
    raysens report runs/sweep-tiny-10k                                       # report over the points

On a cluster (from a machine that reaches the dashboard; the working dir is uploaded):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/sweep.py jobs/configs/sweep_cluster_qwen2_1p5b.yaml \\
        --dir=s3://BUCKET/raysens/sweep-qwen2-1.5b --cluster.num_actors=8

Inside a running cluster (on the head node): ``python jobs/sweep.py CONFIG --address=auto``.
Overrides: sweep keys (``--dir=``, ``--grid.seq_lens=[32,64]``, ``--corpus.samples=``) or run-config
keys applied to every point (``--data.limit=100``, ``--cluster.batch_size=8``).

raysens must be importable: installed (``make install``, the deploy image), or the repository root on
``PYTHONPATH``, which ``ray job submit --working-dir .`` sets for the uploaded copy of the repository.
"""

import sys

from raysens.cli import main_sweep

if __name__ == "__main__":
    sys.exit(main_sweep(sys.argv[1:]))
