"""Entry point from a checkout: `accelerate launch train.py --config train_configs/shapes.yaml`.

Installed, the same runs as `accelerate launch -m ldm_pipeline.train --config ...`.
"""

import sys

from ldm_pipeline.train import main

if __name__ == "__main__":
    sys.exit(main())
