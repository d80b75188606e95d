"""Entry point of `make assets`: `python -m pipeline.assets` builds what the default run needs and prints where.

Runs `pipeline.assets.prepare.prepare_default_assets` and prints one line per asset: its name and its location.
"""

from __future__ import annotations

from pipeline.assets.prepare import prepare_default_assets

if __name__ == "__main__":
    for name, location in prepare_default_assets().items():
        print(f"{name:24} {location}")
