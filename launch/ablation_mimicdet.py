"""MimicDet ablation (Lu 2020): dual-path head mimicking, its paths, staggered pyramid, separate teacher.

Locally:      python launch/ablation_mimicdet.py --preset quick
On a cluster: ray job submit --working-dir . -- python launch/ablation_mimicdet.py --preset paper --data /data/coco ...
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `ray job submit --working-dir .` ships the source, not an install

from kdsweep.orchestrate.ablation import run_ablation  # noqa: E402

SPACE = ROOT / "search_spaces" / "ablation_mimicdet.yaml"

if __name__ == "__main__":
    sys.exit(run_ablation(SPACE, prog="ablation_mimicdet.py"))
