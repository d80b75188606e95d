"""The entry points, above the flows: the `finetune` command (finetune/cli.py) and the Python API.

    from finetune import FineTuner
    ft = FineTuner("smollm2-135m-instruct")
    ft.load_data("faq.jsonl", input_key="question", output_key="answer"); report = ft.train(); ft.evaluate()

Layering: finetune -> flows -> tasks -> pipeline; nothing below imports what is above it
(tests/unit/test_layering.py).
"""

from pipeline.lazy_exports import lazy_exports

# Imported lazily: `finetune.cli` must set its environment defaults before Prefect is imported.
__getattr__, __dir__, __all__ = lazy_exports(__name__, {"api": ("FineTuner", "RunReport")}, globals())
