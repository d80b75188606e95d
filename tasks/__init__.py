"""The pipeline's stages, one module each: a pure core plus one thin Prefect task."""
