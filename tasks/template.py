"""Stage 2, template: turn each question/answer pair into a prompt and a completion.

In: the collect artifact (`rows.jsonl`) and `TemplateConfig`. Out: `rows.jsonl`
with `{"id", "question", "answer", "prompt", "completion", "text"}`. The prompt and
completion are kept apart (evaluation generates from the prompt; the loss can be
masked to the completion) and joined in `text` (the text-only form). The EOS
token is appended at tokenization, where the tokenizer is known.
"""

from __future__ import annotations

from pipeline.config import StoreConfig, TemplateConfig
from pipeline.refs import Ref
from pipeline.stage import begin_stage, stage_task
from tasks.collect import read_jsonl, write_jsonl

VERSION = "1"

QA_PROMPT = "### Question:\n{question}\n\n### Answer:\n"


def render_prompt(question: str, config: TemplateConfig) -> str:
    """The prompt a model sees for `question` (also used at inference time)."""
    return QA_PROMPT.format(question=question)


def apply_template(row: dict, config: TemplateConfig) -> dict:
    """A collected row plus its prompt, completion and the joined text."""
    prompt = render_prompt(row["question"], config)
    return {**row, "prompt": prompt, "completion": row["answer"], "text": prompt + row["answer"]}


@stage_task("template", version=VERSION)
def template(collected: Ref, config: TemplateConfig, store: StoreConfig) -> Ref:
    """Apply the prompt template to every collected row; returns the artifact's Ref."""
    stage = begin_stage(store)
    if stage.committed:
        return stage.ref
    rows = read_jsonl(stage.fetch(collected) / "rows.jsonl")
    count = write_jsonl(stage.dir / "rows.jsonl", (apply_template(row, config) for row in rows))
    return stage.commit(meta={"rows": count, "template": config.name})
