"""Entry point of a training process: `python -m tasks.train <job.json>` (also the torchrun and accelerate target).

Runs `tasks.train.process.main` and exits with its code.
"""

from __future__ import annotations

import sys

from tasks.train.process import main

if __name__ == "__main__":
    sys.exit(main())
