"""Quick start: SmolLM2-135M (offline), the bundled English corpus, S=32, on an embedded local Ray.

    python jobs/quickstart.py                       # or: make quickstart
    python jobs/quickstart.py --data.limit=50       # any override of jobs/configs/quickstart.yaml

Prints where the statistics and heatmaps were written. Inside ``ray job submit`` (``$RAY_ADDRESS``
set) it runs on that cluster instead:

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/quickstart.py --data.limit=50

raysens must be importable: installed (``make install``, the deploy image), or the repository root on
``PYTHONPATH``, which ``ray job submit --working-dir .`` sets for the uploaded copy of the repository.
"""

import sys
from pathlib import Path

from raysens.cli import main_run

CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"

if __name__ == "__main__":
    sys.exit(main_run(sys.argv[1:], default_config=str(CONFIG)))
