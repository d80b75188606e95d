"""What every stage shares, below the stages: the config tree, the artifact store, refs and keys, the stage
decorator, packaged assets, model loading, the row model, prompts, statistics.

It imports neither `tasks/` nor `flows/` (tests/unit/test_layering.py); the entry points (the CLI and
`FineTuner`) live in `finetune/`.
"""
