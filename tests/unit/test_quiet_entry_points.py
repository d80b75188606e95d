"""Run directly (not through the Makefile), `finetune` is as quiet as under `make`.

The command sets the environment the Makefile exports (no Prefect telemetry and its DNS error, the hub
offline, ...) without overriding what the user set, before Prefect is imported; the benchmark stage keeps
lm-eval from running `git describe`, which prints `fatal: not a git repository` outside a checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli import ENVIRONMENT_DEFAULTS, main, set_environment_defaults

ROOT = Path(__file__).resolve().parents[2]


def makefile_exports() -> dict[str, str]:
    """`export NAME ?= value` lines of the Makefile, as {NAME: value}."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return dict(re.findall(r"^export (\w+) \?= (\S+)$", text, flags=re.MULTILINE))


def test_the_cli_defaults_are_the_makefile_exports():
    assert makefile_exports() == ENVIRONMENT_DEFAULTS


def test_defaults_fill_only_what_the_user_left_unset():
    environ = {"HF_HUB_OFFLINE": "0", "TOKENIZERS_PARALLELISM": ""}  # the user's, even an empty one, stays
    added = set_environment_defaults(environ)
    assert environ["HF_HUB_OFFLINE"] == "0" and environ["TOKENIZERS_PARALLELISM"] == ""
    assert added == {
        name: value
        for name, value in ENVIRONMENT_DEFAULTS.items()
        if name not in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
    }
    assert environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert set_environment_defaults(environ) == {}  # a second call changes nothing


def test_the_command_sets_them_in_its_process(monkeypatch, capsys):
    users = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    for name in ENVIRONMENT_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(users, "300")
    assert main(["validate", "--config", str(ROOT / "configs" / "tiny.yaml")]) == 0
    assert os.environ[users] == "300"
    assert all(os.environ[name] == value for name, value in ENVIRONMENT_DEFAULTS.items() if name != users)


def test_loading_the_command_imports_neither_prefect_nor_hugging_face():
    # They read their settings when they load: the defaults must be in place before that.
    code = (
        "import sys, finetune.cli; "
        "print(sorted(m for m in ('prefect', 'transformers', 'huggingface_hub', 'datasets') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _outside_git(path: Path) -> bool:
    return subprocess.run(["git", "-C", str(path), "rev-parse"], capture_output=True).returncode != 0


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed: nothing could print its error")
def test_lm_eval_asks_git_for_nothing_while_a_benchmark_runs(tmp_path, monkeypatch, capfd):
    import lm_eval.evaluator

    from tasks.benchmark import no_git_commit_lookup

    if not _outside_git(tmp_path):
        pytest.skip(f"{tmp_path} is inside a git checkout")
    monkeypatch.chdir(tmp_path)
    lm_eval.evaluator.get_git_commit_hash()
    assert "fatal:" in capfd.readouterr().err  # what lm-eval's lookup does on its own here
    with no_git_commit_lookup():
        assert lm_eval.evaluator.get_git_commit_hash() is None
    assert "fatal:" not in capfd.readouterr().err
    assert lm_eval.evaluator.get_git_commit_hash.__name__ == "get_git_commit_hash"  # restored afterwards
