"""SSIM structural-KD ablation (de Rijk 2022): teacher once, then rows x seeds on Ray Tune.

Locally:      python launch/ablation_ssim.py --preset quick
On a cluster: ray job submit --working-dir . -- python launch/ablation_ssim.py --preset paper --data /data/coco ...
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `ray job submit --working-dir .` ships the source, not an install

from kdsweep.orchestrate.ablation import run_ablation  # noqa: E402

SPACE = ROOT / "search_spaces" / "ablation_ssim.yaml"

if __name__ == "__main__":
    sys.exit(run_ablation(SPACE, prog="ablation_ssim.py"))
