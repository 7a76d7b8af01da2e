"""`python -m mmdit_diffusers.train`: the same as `mmdit-diffusers train` (see `mmdit_diffusers.cli.train`), for
`accelerate launch -m mmdit_diffusers.train --config ...`, which needs a module to run."""

from __future__ import annotations

import sys

from .cli.train import main

if __name__ == "__main__":
    sys.exit(main())
