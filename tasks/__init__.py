"""The pipeline's stages, one module (for a large stage, a package) each: pure cores plus one thin Prefect task."""
