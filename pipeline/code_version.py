"""The code version of a stage: a hash of its module's source and of the project modules it imports, transitively.

A stage's content key covers this hash (`pipeline.stage.stage_task`), so editing a stage's code, or a
`pipeline.*`/`tasks.*` module it uses, reruns that stage and every stage after it, while editing a module it
does not use (`pipeline/planner/`, `flows/sweep.py`) reuses what is stored. The import graph is read
statically: every `import` and `from ... import` statement anywhere in a file (inside functions too, and
relative ones), resolved to a file of the project's own packages; other imports (the standard library,
installed packages) are not followed. Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` too, so
those count as well. A stage defined in a package (`tasks/collect/stage.py`) counts every file of its package
(`tasks/collect/`), imported or not, `__main__.py` included (`python -m tasks.train` runs it). Results are cached
per process: a module's source is read once.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PROJECT_PACKAGES = ("pipeline", "tasks")
"""Top-level packages whose modules take part in a stage's code version (stages import nothing else of ours)."""

ROOT = Path(__file__).resolve().parents[1]
"""The folder holding the project's packages (the repository, or site-packages when installed)."""


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted module name of a file under `root` ('tasks/split.py' -> 'tasks.split', 'a/__init__.py' -> 'a').

    A file outside `root` (a stage defined in a test) is named by its file name alone.
    """
    path, root = path.resolve(), root.resolve()
    parts = list((path.relative_to(root) if path.is_relative_to(root) else Path(path.name)).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of the project module `name` under `root` (a package's `__init__.py`), None when it is not one."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported_names(source: str, name: str, is_package: bool) -> set[str]:
    """Every module name the source of module `name` may import, relative imports made absolute.

    `from a import b` gives 'a' and 'a.b' (b may be a submodule or a name defined in a); names that are
    not modules are dropped later, when they resolve to no file.
    """
    package = name if is_package else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n}


def _with_parents(name: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b', 'a.b.c']: importing a module runs its parent packages' __init__ first."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]


@cache
def _file_imports(path: Path, root: Path) -> frozenset[Path]:
    """The project files one file imports directly (parents' __init__ included); read once per process."""
    is_package = path.name == "__init__.py"
    found = set()
    for name in imported_names(path.read_text(encoding="utf-8"), module_name(path, root), is_package):
        for part in _with_parents(name):
            target = module_file(part, root)
            if target is not None:
                found.add(target.resolve())
    return frozenset(found)


def package_files(path: Path, root: Path = ROOT) -> list[Path]:
    """Every file of the stage package the module at `path` belongs to, sorted; [] for a module that is in none.

    A stage package is a package right below a project package: 'tasks/collect/readers.py' gives every '*.py'
    under 'tasks/collect/' ('__main__.py' too), 'tasks/split.py' (a module of 'tasks' itself) gives [].
    """
    path, root = path.resolve(), root.resolve()
    parts = module_name(path, root).split(".")
    if not path.is_relative_to(root) or len(parts) < 2 or parts[0] not in PROJECT_PACKAGES:
        return []
    folder = root.joinpath(*parts[:2])
    if not (folder / "__init__.py").is_file():
        return []
    return sorted(p.resolve() for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def code_files(path: Path, root: Path = ROOT) -> list[Path]:
    """The file at `path` and every project file it imports, transitively, sorted; its own parent packages too.

    For a module of a stage package (`package_files`), every file of that package and what those import.
    """
    start = path.resolve()
    root = root.resolve()
    seen: set[Path] = {start, *package_files(start, root)}
    seen.update(p.resolve() for p in (module_file(n, root) for n in _with_parents(module_name(start, root))) if p)
    todo = list(seen)
    while todo:
        for target in _file_imports(todo.pop(), root):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return sorted(seen)


@cache
def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@cache
def code_version(path: Path, root: Path = ROOT) -> str:
    """The code version of the module in `path`: 16 hex digits of a hash over its code files' paths and bytes.

    In: a module file under `root`. Out: the same value for the same code, whatever the machine or the
    folder the repository sits in (paths are taken relative to `root`).
    """
    root = root.resolve()
    digest = hashlib.sha256()
    for file in code_files(path, root):
        name = file.relative_to(root).as_posix() if file.is_relative_to(root) else file.name
        digest.update(f"{name}\0{_file_digest(file)}\n".encode())
    return digest.hexdigest()[:16]
