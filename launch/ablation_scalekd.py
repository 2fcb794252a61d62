"""ScaleKD ablation (Zhu 2023): SDF, the cross-scale assistant, the high-resolution teacher.

Locally:      python launch/ablation_scalekd.py --preset quick
On a cluster: ray job submit --working-dir . -- python launch/ablation_scalekd.py --preset paper --data /data/coco ...
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `ray job submit --working-dir .` ships the source, not an install

from kdsweep.orchestrate.ablation import run_ablation  # noqa: E402

SPACE = ROOT / "search_spaces" / "ablation_scalekd.yaml"

if __name__ == "__main__":
    sys.exit(run_ablation(SPACE, prog="ablation_scalekd.py"))
