"""Importing the flows, the CLI and the Python API loads no machine-learning library.

torch, transformers, peft, datasets, sentence-transformers and lm-eval come in when a stage body needs them (a
model trains, answers or is scored), not when a process imports the flow, and `finetune run`'s check of the
training device loads torch only for a config a device may not train (16-bit weights or precision, QLoRA). So a
run whose stages all come back Cached, `finetune validate`, a served deployment starting up and a placed train
stage's parent process skip about 6 s of CPU each (`bench/flow_startup.py`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "datasets", "sentence_transformers", "lm_eval", "accelerate", "matplotlib")
ENTRY_MODULES = ("flows.finetune", "flows.sweep", "flows.promotion", "finetune.cli", "finetune.api", "tasks.train")


def modules_loaded_by(imports: str) -> list[str]:
    """The HEAVY libraries a fresh interpreter has loaded after running `imports` in the repository."""
    probe = f"import sys\n{imports}\nimport json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_entry_points_import_no_machine_learning_library():
    imports = "\n".join(f"import {module}" for module in ENTRY_MODULES)
    imports += "\nimport runpy\nrunpy.run_path('deployments/serve.py')"  # what `prefect deploy` and serving import
    assert modules_loaded_by(imports) == []


def test_the_cli_checks_a_float32_config_without_torch():
    check = "from pipeline.config import ModelConfig, TrainConfig\nfrom pipeline.models import check_training_device"
    assert modules_loaded_by(f"{check}\ncheck_training_device(ModelConfig(), TrainConfig())") == []


def test_the_check_sees_a_library_that_is_imported():
    assert "torch" in modules_loaded_by("import tasks.evaluate.generation")
