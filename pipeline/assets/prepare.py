"""Everything the default run needs, built once ahead of it (`make assets`, `python -m pipeline.assets`)."""

from __future__ import annotations

from pipeline.assets.arc import arc_data_dir
from pipeline.assets.models import DEFAULT_MODEL, embedding_model_path, resolve_model


def prepare_default_assets() -> dict[str, str]:
    """Build everything the default run needs once (the converted default model, ARC data, the embedding model).

    Out: what was prepared and where. Used by `make run` so the first run's stage
    timings measure the stages, not a one-off conversion.
    """
    return {
        DEFAULT_MODEL: resolve_model(DEFAULT_MODEL),
        "tiny-neox": resolve_model("tiny-neox"),
        "arc": str(arc_data_dir()),
        "embedding": embedding_model_path(),
    }
