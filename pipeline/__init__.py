"""What every stage shares: config, artifact store, refs, packaged assets, the CLI, and the Python API.

    from pipeline import FineTuner
"""

from typing import Any


def __getattr__(name: str) -> Any:
    # Imported lazily: `import pipeline.config` must not pay for Prefect and torch.
    if name in ("FineTuner", "RunReport"):
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = ["FineTuner", "RunReport"]
