"""Any search-space file as a Ray Tune search (Optuna / ASHA from its ``search`` block).

Locally:      python launch/sweep.py search_spaces/tune_ssim.yaml --preset smoke --num-samples 8
Check only:   python launch/sweep.py search_spaces/tune_scalekd.yaml --dry-run
On a cluster: ray job submit --working-dir . -- python launch/sweep.py search_spaces/tune_ssim.yaml --preset paper ...
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `ray job submit --working-dir .` ships the source, not an install

from kdsweep.orchestrate.search import run_sweep  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_sweep(prog="sweep.py"))
