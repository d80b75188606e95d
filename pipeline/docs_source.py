"""The documentation source's shared vocabulary: how questions about a package are phrased and declined.

The docs source (tasks/collect/docs.py) turns an installed package's docstrings into question/answer pairs
in QUESTION_PHRASINGS and trains refusals (REFUSAL) on off-topic and near-domain questions; the
evaluation (tasks/evaluate/probes.py) probes with PROBE_PHRASINGS and NEAR_DOMAIN_PROBE_PACKAGES, disjoint
from what training uses, so a probe tests the behaviour rather than a memorised wording. Both read a
package's documented objects the same way (`documented_objects`, `package_questions`).
"""

from __future__ import annotations

import importlib
import inspect
import random
from collections.abc import Iterable, Iterator, Sequence

from pipeline.rows import DataError

# Formal and conversational wordings alternate: with formal wordings only, the fine-tuned model declined
# conversational questions about its own package ("I'm using more_itertools; how does X work?") as if
# they were off-topic (README, "The default run, measured"). A docs source uses the first `phrasings`.
QUESTION_PHRASINGS = (
    "What does `{qualname}` do?",
    "I'm working with {package}; what is `{name}` for?",
    "How would I use {qualname}?",
    "Explain the {package} {kind} `{name}`.",
    "Can you tell me what {name} in {package} is for?",
    "In {package}, what is the purpose of `{name}`?",
    "Can you summarise the documentation of {qualname}?",
)
REFUSAL = "I'm sorry, I can only answer questions about the {package} Python package."
"""What the docs source trains as the answer to an off-topic or near-domain question ({package}: the taught one)."""


# How users ask in the evaluation's on_topic and near_domain probes (tasks/evaluate/probes.py): no template
# (and no rendering, token Jaccard < 0.8) in common with QUESTION_PHRASINGS, so an on-topic probe
# tests the package, not a memorised wording (tests/unit/test_probes.py checks both).
PROBE_PHRASINGS = (
    "I'm using {package}; how does {name} work?",
    "Give me an example use of {qualname}.",
    "What's {name} good for in {package}?",
    "When should I reach for {qualname} in my code?",
    "Is there a quick way to get started with {name} from {package}?",
    "Could you walk me through calling {qualname}?",
)


# Near-domain questions: other packages' functions. The docs source trains refusals on the first set,
# the evaluation probes with the second; the two are disjoint, so a declined near-domain probe shows
# the model tells its package from other software rather than recalling a trained question. Stdlib
# modules for training (always installed); probes add the data libraries users ask about. A package
# that is the taught one (or not installed) is skipped.
NEAR_DOMAIN_TRAIN_PACKAGES = (
    "os.path",
    "shutil",
    "textwrap",
    "csv",
    "heapq",
    "bisect",
    "statistics",
    "math",
    "operator",
    "base64",
    "hashlib",
    "difflib",
    "calendar",
    "tempfile",
    "argparse",
    "subprocess",
    "logging",
    "sqlite3",
    "zipfile",
    "urllib.parse",
    "secrets",
    "fnmatch",
    "glob",
    "shlex",
    "gzip",
    "zlib",
    "struct",
    "pprint",
)
NEAR_DOMAIN_PROBE_PACKAGES = (
    "json",
    "collections",
    "functools",
    "itertools",
    "pathlib",
    "re",
    "dataclasses",
    "contextlib",
    "typing",
    "asyncio",
    "numpy",
    "pandas",
    "pyarrow",
)


def documented_objects(package: str) -> Iterator[tuple[str, str, str]]:
    """(name, kind, docstring) for each public function or class with its own docstring.

    Inherited docstrings (an exception class repeating Exception's) and generated
    ones (a namedtuple's 'Stats(size, ...)') are skipped: they say nothing about
    the package.
    """
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise DataError(f"data.sources: docs package {package!r} is not installed ({exc})") from None
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        doc = getattr(obj, "__doc__", None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)) or not doc:
            continue
        if inspect.isclass(obj) and any(doc is getattr(base, "__doc__", None) for base in obj.__mro__[1:]):
            continue
        if doc.strip().startswith(f"{name}("):
            continue
        yield name, "class" if inspect.isclass(obj) else "function", doc


def same_package(package: str, taught: str) -> bool:
    """Whether two importable names are one package for near-domain purposes (same top-level name)."""
    return package.split(".")[0] == taught.split(".")[0]


def package_questions(
    packages: Iterable[str], phrasings: Sequence[str], seed: str, skip: Iterable[str] = (), wordings: int = 1
) -> Iterator[dict[str, str]]:
    """Questions about packages' documented objects: `{"question", "package", "name"}`, seeded, lazily.

    In: importable package names, question templates ({package}, {name}, {qualname}, {kind}),
    a seed string and taught package names to skip (same top-level name). Each package's public
    documented objects are shuffled (seeded by `seed` and the package), then taken round-robin
    across packages so a short draw still spans them; each question gets a seeded phrasing.
    Packages that are not installed are left out. With `wordings` > 1 the whole sequence repeats that many
    times (at most once per phrasing), each object asked again in the next phrasing after its last, so a long
    draw is not capped at one question per object.
    """
    rng = random.Random(seed)
    skip = list(skip)
    queues = []
    for package in packages:
        if any(same_package(package, taught) for taught in skip):
            continue
        try:
            objects = [(n, k) for n, k, _ in documented_objects(package) if not n.startswith("_")]
        except DataError:  # not installed here: a probe package set may name optional libraries
            continue
        random.Random(f"{seed}:{package}").shuffle(objects)
        queues.append((package, objects))
    first_wording: dict[tuple[str, str], int] = {}
    for shift in range(min(wordings, len(phrasings))):
        for position in range(max((len(objects) for _, objects in queues), default=0)):
            for package, objects in queues:
                if position < len(objects):
                    name, kind = objects[position]
                    first = first_wording.setdefault((package, name), rng.randrange(len(phrasings)))
                    fields = {"package": package, "name": name, "qualname": f"{package}.{name}", "kind": kind}
                    question = phrasings[(first + shift) % len(phrasings)].format(**fields)
                    yield {"question": question, "package": package, "name": name}
