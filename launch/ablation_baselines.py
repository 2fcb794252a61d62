"""The modern baselines (PKD, CWD, MGD, FGD, CrossKD) next to L2 and SSIM: teacher once, then rows x seeds on Ray Tune.

Locally:      python launch/ablation_baselines.py --preset quick
On a cluster: ray job submit --working-dir . -- python launch/ablation_baselines.py --preset paper --data /data/coco ...
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `ray job submit --working-dir .` ships the source, not an install

from kdsweep.orchestrate.ablation import run_ablation  # noqa: E402

SPACE = ROOT / "search_spaces" / "ablation_baselines.yaml"

if __name__ == "__main__":
    sys.exit(run_ablation(SPACE, prog="ablation_baselines.py"))
