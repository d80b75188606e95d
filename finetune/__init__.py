"""The entry points, above the flows: the `finetune` command (finetune/cli.py) and the Python API.

    from finetune import FineTuner
    ft = FineTuner("smollm2-135m-instruct")
    ft.load_data("faq.jsonl", input_key="question", output_key="answer"); report = ft.train(); ft.evaluate()

Layering: finetune -> flows -> tasks -> pipeline; nothing below imports what is above it
(tests/unit/test_layering.py).
"""

from typing import Any


def __getattr__(name: str) -> Any:
    # Imported lazily: `finetune.cli` must set its environment defaults before Prefect is imported.
    if name in ("FineTuner", "RunReport"):
        from finetune import api

        return getattr(api, name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")


__all__ = ["FineTuner", "RunReport"]
