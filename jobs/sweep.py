"""Ray job entrypoint for sweeps: ``python jobs/sweep.py SWEEP.yaml [--key=value ...] [--dry-run]``.

The same as ``raysens sweep``. One job runs every cell of the sweep (``raysens.sweep``); each cell
writes its own run directory under the sweep's ``dir``, so rerunning the same command after a crash
skips the finished cells and resumes the unfinished one from its partials.

Here (embedded local Ray, CPU):

    python jobs/sweep.py jobs/configs/sweep_tiny_10k.yaml
    python jobs/sweep.py jobs/configs/sweep_tiny_10k.yaml --corpus.samples=1000 --dir=runs/sweep-tiny-1k
    python jobs/sweep.py jobs/configs/sweep_tiny_10k.yaml --dry-run          # list the cells
    raysens sweep jobs/configs/sweep_tiny_10k.yaml                           # the same, via the CLI
    raysens report runs/sweep-tiny-10k                                       # report over the cells

On a cluster (from a machine that reaches the dashboard; the working dir is uploaded):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/sweep.py jobs/configs/sweep_cluster_qwen2_1p5b.yaml \\
        --dir=s3://BUCKET/raysens/sweep-qwen2-1.5b --cluster.num_actors=8

Inside a running cluster (on the head node): ``python jobs/sweep.py CONFIG --address=auto``.
Overrides: sweep keys (``--dir=``, ``--grid.seq_lens=[32,64]``, ``--corpus.samples=``) or run-config
keys applied to every cell (``--data.limit=100``, ``--cluster.batch_size=8``).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `ray job submit --working-dir .` runs this file from an uploaded copy of the repo
    sys.path.insert(0, str(ROOT))

from raysens.sweep import main_sweep  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_sweep(sys.argv[1:]))
