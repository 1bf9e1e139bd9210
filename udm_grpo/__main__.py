"""`python -m udm_grpo` = the `udm-grpo` command (also under torchrun / accelerate launch)."""

import sys

from .cli import main

sys.exit(main())
