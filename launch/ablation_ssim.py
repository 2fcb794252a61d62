"""SSIM structural-KD ablation (de Rijk 2022): teacher once, then rows x seeds on Ray Tune.

Locally:      python launch/ablation_ssim.py --preset quick
On a cluster: ray job submit --working-dir . -- python launch/ablation_ssim.py --preset paper --data /data/coco ...
"""

import sys
from pathlib import Path

from kdsweep.ablation import run_ablation

SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "ablation_ssim.yaml"

if __name__ == "__main__":
    sys.exit(run_ablation(SPACE, prog="ablation_ssim.py"))
