"""Quick start: SmolLM2-135M (offline), the bundled English corpus, S=32, on an embedded local Ray.

    python jobs/quickstart.py                       # or: make quickstart
    python jobs/quickstart.py --data.limit=50       # any override of jobs/configs/quickstart.yaml

Prints where the statistics and heatmaps were written. Inside ``ray job submit`` (``$RAY_ADDRESS``
set) it runs on that cluster instead.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `ray job submit --working-dir .` runs this file from an uploaded copy of the repo
    sys.path.insert(0, str(ROOT))

from raysens.cli import main_run  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"

if __name__ == "__main__":
    sys.exit(main_run(sys.argv[1:], default_config=str(CONFIG)))
