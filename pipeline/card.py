"""The model card of a model that passed its gates: a Hugging Face `README.md` with YAML metadata.

In: the store and the passing round's stage entries (stage label, artifact uri, sha256), the resolved
config, the config path and overrides, the flow run id. Out: `card_facts` gathers every figure from the
artifacts themselves (each JSON file checked against its manifest's sha256): the data summary (collect's
`report.json`, tokenize's `report.json`, validate's `quality.json`), the resolved training config and
losses (train's `train_config.json`, `report.json`), the evaluation and benchmark figures with the gate
verdicts and their intervals (the gate's `verdicts.json`, `metrics.json`; the benchmark slices'
`results.json`) and the lineage (every stage's uri and sha256, config path, overrides, flow run id).
`render_card` turns those facts into the card; `write_card` stores both under `cards/<train key>/`
(`README.md`, `card.json`), next to the model, never inside it: the train artifact is content-addressed
and immutable, while a card names the flow run that promoted it. `finetune export` copies the card into
the exported folder as its `README.md`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import PipelineConfig
from pipeline.store import ArtifactStore, CorruptArtifact, sha256_bytes

CARDS_PREFIX = "cards"
CARD_FILE = "README.md"
FACTS_FILE = "card.json"
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""The hub id of a built-in model alias, for the card's `base_model` (tiny-neox is a random test model)."""


def card_prefix(train_uri: str) -> str:
    """Where the card of the model in train artifact `train_uri` ('train/<key>') lives: 'cards/<key>'."""
    return f"{CARDS_PREFIX}/{train_uri.strip('/').split('/')[1]}"


def read_card(store: ArtifactStore, train_uri: str) -> str | None:
    """The card (README.md text) of the model in `train_uri`, or None when no passing run wrote one."""
    path = f"{card_prefix(train_uri)}/{CARD_FILE}"
    return store.get_bytes(path).decode("utf-8") if store.exists(path) else None


def read_verified_json(store: ArtifactStore, uri: str, name: str) -> Any:
    """One JSON file of a committed artifact, checked against its manifest's sha256 (without fetching the rest).

    Raises CorruptArtifact when the bytes do not match, ArtifactNotFound when missing.
    """
    manifest = store.read_manifest(uri) or {}
    data = store.get_bytes(f"{uri}/{name}")
    expected = manifest.get("files", {}).get(name, {}).get("sha256")
    if expected != sha256_bytes(data):
        raise CorruptArtifact(uri, name, str(expected), sha256_bytes(data))
    return json.loads(data)


def _entry(stages: list[dict[str, Any]], label: str, last: bool = False) -> dict[str, Any]:
    """The stage entry whose label is `label` or starts with `label (`; the last one when `last`."""
    found = [e for e in stages if e["stage"] == label or e["stage"].startswith(f"{label} (")]
    if not found:
        raise KeyError(f"no {label!r} stage among {[e['stage'] for e in stages]}")
    return found[-1] if last else found[0]


def card_facts(
    store: ArtifactStore,
    stages: list[dict[str, Any]],
    config: PipelineConfig,
    *,
    config_path: str | None,
    overrides: list[str],
    flow_run_id: str,
    round_number: int,
) -> dict[str, Any]:
    """Every fact the card states, read from the artifacts of the passing round's `stages` (JSON-ready)."""
    collect, tokenize, validate = (_entry(stages, name) for name in ("collect", "tokenize", "validate"))
    train, gate = _entry(stages, "train"), _entry(stages, "gate", last=True)
    collect_report = read_verified_json(store, collect["uri"], "report.json")
    tokenize_report = read_verified_json(store, tokenize["uri"], "report.json")
    quality = read_verified_json(store, validate["uri"], "quality.json")
    train_config = read_verified_json(store, train["uri"], "train_config.json")
    train_report = read_verified_json(store, train["uri"], "report.json")
    verdicts = read_verified_json(store, gate["uri"], "verdicts.json")
    metrics = read_verified_json(store, gate["uri"], "metrics.json")
    benchmarks = []
    for entry in stages:
        if entry["stage"].startswith("benchmark (fine-tuned"):
            results = read_verified_json(store, entry["uri"], "results.json")
            for task, figures in results["tasks"].items():
                benchmarks.append(
                    {
                        "task": task,
                        "questions": figures["n_samples"],
                        "dataset": figures.get("dataset"),
                        "num_fewshot": figures.get("num_fewshot"),
                        "lm_eval_version": results.get("lm_eval_version"),
                        "slice": f"{results['sample']['start']}-{results['sample']['end']}",
                    }
                )
    spec = config.model.name
    return {
        "alias": train_report["alias"],
        "model_uri": f"{train['uri']}/model",
        "train_uri": train["uri"],
        "base_model": spec,
        "base_model_hub_id": HUB_IDS.get(spec),
        "method": train_report["method"],
        "template": train_config.get("template", config.template.model_dump(mode="json")),
        "dataset_name": train_config["train"].get("dataset_name"),
        "data": {
            "sources": [
                {k: s[k] for k in ("source", "role", "schema", "rows_read", "rows_kept", "dropped")}
                for s in collect_report["sources"]
            ],
            "rows_read": collect_report["rows_read"],
            "rows": collect_report["rows"],
            "dropped_collect": collect_report["dropped"],
            "not_drawn": collect_report["not_drawn"],
            "rows_tokenized": tokenize_report["rows"],
            "dropped_tokenize": tokenize_report["dropped"],
            "truncated": tokenize_report["truncated"],
            "rows_by_role": quality["rows_by_role"],
            "duplicate_rate": quality["duplicate_rate"],
            "dropped_share": quality["dropped_share"],
        },
        "training": {
            "config": train_config["train"],
            "report": {
                k: train_report[k]
                for k in (
                    "steps",
                    "epochs",
                    "train_rows",
                    "examples_seen",
                    "parameters",
                    "trainable_parameters",
                    "first_loss",
                    "final_train_loss",
                    "test_loss",
                    "device",
                    "precision",
                )
            },
        },
        "evaluation": {
            "passed": verdicts["passed"],
            "look": verdicts["look"],
            "verdicts": verdicts["verdicts"],
            "metrics": {"base": metrics["base"], "fine_tuned": metrics["fine_tuned"]},
            "benchmarks": benchmarks,
        },
        "lineage": {
            "stages": [{"stage": e["stage"], "uri": e["uri"], "sha256": e["sha256"]} for e in stages],
            "config_path": config_path,
            "overrides": list(overrides),
            "flow_run_id": flow_run_id,
            "round": round_number,
            "store": store.uri,
        },
    }


# --------------------------------------------------------------------------- rendering


def num(value: Any) -> str:
    """A figure as the card prints it: integers whole, floats rounded to 6 decimals (as verdicts.json keeps them)."""
    if isinstance(value, bool | str) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    return repr(round(float(value), 6))


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in counts.items()) or "none"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def metadata(facts: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML metadata (Hugging Face model card fields)."""
    tags = [
        "finetune-pipeline",
        "text-generation",
        f"{facts['method']}-fine-tune",
        f"template-{facts['template']['name']}",
    ]
    return {
        "base_model": facts["base_model_hub_id"] or facts["base_model"],
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": tags,
        "datasets": [source["source"] for source in facts["data"]["sources"]],
    }


def render_card(facts: dict[str, Any]) -> str:
    """The model card: YAML metadata between `---` lines, then markdown sections."""
    data, training, evaluation, lineage = facts["data"], facts["training"], facts["evaluation"], facts["lineage"]
    template = facts["template"]
    subject = facts["dataset_name"] or ", ".join(s["source"] for s in data["sources"])
    base = facts["base_model"] + (f" ({facts['base_model_hub_id']})" if facts["base_model_hub_id"] else "")
    lines = [
        "---",
        yaml.safe_dump(metadata(facts), sort_keys=False, allow_unicode=True).strip(),
        "---",
        "",
        f"# {facts['alias']}",
        "",
        f"A question-answering model for **{subject}**, fine-tuned from `{base}` ({facts['method']}) by "
        f"finetune-pipeline. It answers one question at a time in the style of its training answers, and was "
        f"promoted because it passed every gate in round {lineage['round']} of flow run `{lineage['flow_run_id']}`.",
        "",
        "## Intended use and limits",
        "",
        f"- Questions like the ones in its training data ({subject}); the evaluation below measures how close its "
        "answers are to the reference answers and how often it declines questions outside that subject.",
        f"- Prompt format: the `{template['name']}` template, which the tokenizer carries as its chat template.",
    ]
    if template["name"] == "chat":
        lines.append(
            "- Chat: the base tokenizer's own chat template"
            + (
                f", with the system prompt {template['system_prompt']!r} when none is given."
                if template["system_prompt"]
                else "."
            )
        )
    else:
        lines.append(
            "- One user message per request: the chat template renders it exactly as training rendered a question, "
            "and raises an error for a system message or several turns (the model never saw them)."
        )
    lines += [
        "- Answers are greedy (as evaluated) and stop at the EOS token training appended after every answer "
        "(the generation config says so).",
        "",
        "## Training data",
        "",
        *_table(
            ["source", "role", "schema", "rows read", "rows kept", "dropped"],
            [
                [s["source"], s["role"], s["schema"], num(s["rows_read"]), num(s["rows_kept"]), _counts(s["dropped"])]
                for s in data["sources"]
            ],
        ),
        "",
        *_table(
            ["figure", "value"],
            [
                ["rows read", num(data["rows_read"])],
                ["rows kept by collect", num(data["rows"])],
                ["dropped by collect", _counts(data["dropped_collect"])],
                ["not drawn (source weights)", num(data["not_drawn"])],
                ["rows kept by tokenize", num(data["rows_tokenized"])],
                ["dropped by tokenize", _counts(data["dropped_tokenize"])],
                ["truncated", num(data["truncated"])],
                ["dropped share", num(data["dropped_share"])],
                ["duplicate rate", num(data["duplicate_rate"])],
                ["rows by role", ", ".join(f"{role}: {num(n)}" for role, n in data["rows_by_role"].items())],
            ],
        ),
        "",
        "## Training",
        "",
        *_table(["figure", "value"], [[name, num(value)] for name, value in training["report"].items()]),
        "",
        "Resolved training config (`train` section):",
        "",
        "```yaml",
        yaml.safe_dump(training["config"], sort_keys=False).strip(),
        "```",
        "",
        "## Evaluation",
        "",
        "Gates (each decided on an interval at the stated confidence; docs/gates.md of finetune-pipeline):",
        "",
        *_table(
            ["gate", "estimate", "low", "high", "n", "confidence", "method", "verdict"],
            [
                [
                    v["gate"],
                    num(v["estimate"]),
                    num(v["low"]),
                    num(v["high"]),
                    num(v["n"]),
                    num(v["confidence"]),
                    v["method"],
                    v["decision"] + ("" if v["decided_by"] == "interval" else f" ({v['decided_by']})"),
                ]
                for v in evaluation["verdicts"]
            ],
        ),
        "",
        "Point figures, base model and this model:",
        "",
        *_table(
            ["metric", "base", "fine-tuned"],
            [
                [name, num(evaluation["metrics"]["base"].get(name)), num(value)]
                for name, value in evaluation["metrics"]["fine_tuned"].items()
            ],
        ),
    ]
    if evaluation["benchmarks"]:
        lines += [
            "",
            "Benchmark questions scored (lm-eval):",
            "",
            *_table(
                ["task", "slice", "questions", "few-shot", "dataset", "lm-eval"],
                [
                    [
                        b["task"],
                        b["slice"],
                        num(b["questions"]),
                        num(b["num_fewshot"]),
                        b["dataset"],
                        b["lm_eval_version"],
                    ]
                    for b in evaluation["benchmarks"]
                ],
            ),
        ]
    lines += [
        "",
        "## How to use",
        "",
        "Export a self-contained folder (safetensors, tokenizer with the chat template, generation config, this card):",
        "",
        "```bash",
        f"finetune export {facts['alias']} --to ./{facts['alias']}",
        "```",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("./{facts["alias"]}")',
        f'model = AutoModelForCausalLM.from_pretrained("./{facts["alias"]}")',
        'messages = [{"role": "user", "content": "your question"}]',
        "inputs = tokenizer.apply_chat_template(",
        "    messages, add_generation_prompt=True, return_tensors='pt', return_dict=True",
        ")",
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        "print(tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "Serve it with an OpenAI-compatible API on 127.0.0.1 (`transformers serve`):",
        "",
        "```bash",
        f"finetune serve {facts['alias']} --port 8000",
        "```",
        "",
        "## Lineage",
        "",
        *_table(
            ["figure", "value"],
            [
                ["store", f"`{lineage['store']}`"],
                ["model", f"`{facts['model_uri']}`"],
                ["config", f"`{lineage['config_path']}`"],
                ["overrides", ", ".join(f"`{o}`" for o in lineage["overrides"]) or "none"],
                ["flow run", f"`{lineage['flow_run_id']}`"],
                ["round", num(lineage["round"])],
            ],
        ),
        "",
        *_table(
            ["stage", "artifact", "sha256"],
            [[e["stage"], f"`{e['uri']}`", f"`{e['sha256']}`"] for e in lineage["stages"]],
        ),
        "",
    ]
    return "\n".join(lines)


def write_card(store: ArtifactStore, facts: dict[str, Any]) -> str:
    """Commit the card (`README.md`) and its facts (`card.json`) as the artifact `cards/<train key>`; out: the
    card's path.

    Like every stage output it is committed with a manifest written last, so a half-written card never shows.
    A model's card is written once: a later run that passes with the same model keeps the first card (a
    committed artifact is never overwritten), whose lineage names the run that first promoted it.
    """
    prefix = card_prefix(facts["train_uri"])
    staging = Path(tempfile.mkdtemp(prefix="finetune-card-"))
    try:
        (staging / FACTS_FILE).write_text(json.dumps(facts, indent=2, ensure_ascii=False), encoding="utf-8")
        (staging / CARD_FILE).write_text(render_card(facts), encoding="utf-8")
        store.commit(prefix, staging, kind="card", inputs={}, config={}, meta={"alias": facts.get("alias")})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return f"{prefix}/{CARD_FILE}"
