"""Ray job entrypoint: ``python jobs/run.py CONFIG.yaml [--section.key=value ...]``.

The same as ``raysens run``. Submit it to a cluster from a laptop with

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/run.py jobs/configs/sweep_10k.yaml --output.dir=s3://bucket/runs/sweep
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `ray job submit --working-dir .` runs this file from an uploaded copy of the repo
    sys.path.insert(0, str(ROOT))

from raysens.cli import main_run  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_run(sys.argv[1:]))
