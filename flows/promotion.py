"""What a team runs when a model is promoted: a smoke test of it, started by the `finetune.model.promoted` event.

The fine-tuning flow emits `finetune.model.promoted` once a passing run has moved `latest-passing` to its model
(flows/finetune.py, `announce_promotion`). The deployment `smoke-test-promoted-model/on-promotion`
(deployments/serve.py, deployments/prefect.yaml) carries a trigger for that event, so registering it creates an
automation that runs this flow with the event's alias and store. The flow loads the promoted model from the store
and answers a few questions, prompting it only through the chat template the model carries (what any consumer of
the handed-over folder sees), and shows the answers in the Prefect UI.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from pipeline.models import find_model, load_model, load_tokenizer
from pipeline.store import StoreSettings, open_store

SMOKE_QUESTIONS = ["What can you answer questions about?", "What is the capital of France?"]
"""One question for the model's own subject and one it should decline, unless the trigger passes others."""


@flow(name="smoke-test-promoted-model")
def smoke_test_promoted(
    model: str, store_uri: str, questions: list[str] | None = None, max_new_tokens: int = 32
) -> dict[str, Any]:
    """Answer `questions` with `model` (an alias, `latest-passing`, `train/<key>`) from the store at `store_uri`.

    Prompts are built by the model's tokenizer (`apply_chat_template`, one user message), answers are greedy.
    Out: the model's folder and every question with its answer. Raises when the model cannot be found or loaded,
    or carries no chat template: the run fails, and the promotion gets a second look.
    """
    # torch and transformers come in here, when the smoke test runs, not when deployments/serve.py imports the flow.
    from tasks.evaluate import generate_answers

    log = get_run_logger()
    store = open_store(StoreSettings(uri=store_uri))  # credentials and endpoint, for S3, from the environment
    folder = find_model(model, store)
    tokenizer = load_tokenizer(folder, padding_side="left")
    if not tokenizer.chat_template:
        raise ValueError(f"model {model} ({folder}) carries no chat template: it was not trained by this pipeline")
    asked = list(questions or SMOKE_QUESTIONS)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in asked
    ]
    answers = generate_answers(
        load_model(folder), tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts)
    )
    rows = [{"question": q, "answer": a} for q, a in zip(asked, answers)]
    for row in rows:
        log.info("%s -> %s", row["question"], row["answer"])
    create_table_artifact(table=rows, key="promoted-model-smoke-test", description=f"Smoke test of {model}")
    return {"model": model, "folder": folder, "answers": rows}
