"""Ray job entrypoint: ``python jobs/run.py CONFIG.yaml [--section.key=value ...]``.

The same as ``raysens run``. Submit it to a cluster from a laptop with

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/run.py jobs/configs/sweep_10k.yaml --output.dir=s3://bucket/runs/sweep

Here: ``python jobs/run.py jobs/configs/quickstart.yaml --data.limit=50``; in Kubernetes the RayJob
in ``deploy/kuberay/rayjob.yaml`` runs ``python jobs/run.py jobs/configs/sweep_10k.yaml --output.dir=...``.

raysens must be importable: installed (``make install``, the deploy image), or the repository root on
``PYTHONPATH``, which ``ray job submit --working-dir .`` sets for the uploaded copy of the repository.
"""

import sys

from raysens.cli import main_run

if __name__ == "__main__":
    sys.exit(main_run(sys.argv[1:]))
