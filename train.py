"""Entry point from a checkout: `accelerate launch train.py --config train_configs/shapes.yaml`.

Installed, the same runs as `accelerate launch -m ldm_pipeline.cli train --config shapes ...`.
"""

import sys

from ldm_pipeline.console import quiet_library_logs

quiet_library_logs()  # before the libraries load: some of them speak while they are imported

from ldm_pipeline.training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
