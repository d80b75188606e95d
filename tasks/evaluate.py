"""Stage 6, evaluate: answer the held-out questions and score the answers.

In: the split artifact (`test.parquet`), `EvalConfig`, the base model and,
optionally, a trained model Ref (without one, the base model is evaluated, and
that result is cached on its own, so it is computed once per model and test set).
Out: `answers.parquet` (id, question prompt, target, answer, exact match,
similarity) and `summary.json` (exact-match rate, mean similarity).

Generation is batched with left padding and greedy decoding, and the prompt is
stripped by token count, not by characters. Similarity is the cosine between
all-MiniLM-L6-v2 embeddings of the answer and the target.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.assets import embedding_model_path
from pipeline.config import EvalConfig, ModelConfig, StoreConfig
from pipeline.models import load_model, load_tokenizer, model_folder, pick_device
from pipeline.refs import Ref
from pipeline.stage import begin_stage, stage_task

VERSION = "1"


class EmptyTestSplit(ValueError):
    """The test split has no rows to evaluate."""


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces: the form exact match compares."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def exact_match(answer: str, target: str) -> bool:
    """True when answer and target are equal after `normalise_answer`."""
    return normalise_answer(answer) == normalise_answer(target)


def generate_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy answers for `prompts`, in order, generated in batches of similar length.

    Prompts are sorted by length so each batch pads little, padded on the left so
    every prompt ends where generation starts, and the answer is what follows the
    prompt's tokens, cut at EOS.
    """
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, str] = {}
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch"):
        indices = order[start : start + batch_size]
        encoded = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = encoded.to(model.device)
        with torch.inference_mode():
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        for index, text in zip(indices, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            answers[index] = text.strip()
    return [answers[i] for i in range(len(prompts))]


def similarities(answers: list[str], targets: list[str], device: str = "cpu") -> list[float]:
    """Cosine similarity of each answer to its target, with all-MiniLM-L6-v2 embeddings."""
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(embedding_model_path(), device=device)
    a = encoder.encode(answers, normalize_embeddings=True, convert_to_tensor=True, batch_size=64)
    b = encoder.encode(targets, normalize_embeddings=True, convert_to_tensor=True, batch_size=64)
    return [round(float(x), 6) for x in (a * b).sum(dim=1).cpu()]


def score(prompts: list[str], targets: list[str], answers: list[str]) -> tuple[pa.Table, dict]:
    """Per-example scores and their summary (exact-match rate, mean similarity, empty answers)."""
    matches = [exact_match(a, t) for a, t in zip(answers, targets)]
    sims = similarities(answers, targets)
    table = pa.table({"prompt": prompts, "target": targets, "answer": answers, "exact_match": matches, "similarity": sims})
    n = len(answers)
    summary = {
        "n": n,
        "exact_match": sum(matches) / n,
        "similarity_mean": sum(sims) / n,
        "empty_rate": sum(1 for a in answers if not a) / n,
        "mean_answer_words": sum(len(a.split()) for a in answers) / n,
    }
    return table, summary


def evaluate_model(folder: str, test_path: Path, config: EvalConfig, trust_remote_code: bool) -> tuple[pa.Table, dict]:
    """Generate and score answers for the test split with the model in `folder`."""
    test = pq.read_table(test_path, columns=["id", "prompt", "completion"])
    if config.limit:
        test = test.slice(0, config.limit)
    if test.num_rows == 0:
        raise EmptyTestSplit(f"eval: the test split {test_path} has no rows; raise split.test_fraction or add data")
    tokenizer = load_tokenizer(folder, padding_side="left", trust_remote_code=trust_remote_code)
    model = load_model(folder, device=pick_device(), trust_remote_code=trust_remote_code)
    prompts = test.column("prompt").to_pylist()
    targets = test.column("completion").to_pylist()
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
    table, summary = score(prompts, targets, answers)
    return table.append_column("id", test.column("id")), summary


@stage_task("evaluate", version=VERSION)
def evaluate(split_data: Ref, config: EvalConfig, model: ModelConfig, tuned: Ref | None, store: StoreConfig) -> Ref:
    """Evaluate the fine-tuned model (or the base model when `tuned` is None) on the test split."""
    stage = begin_stage(store)
    if stage.committed:
        return stage.ref
    folder = model_folder(tuned if tuned is not None else model, stage.store)
    table, summary = evaluate_model(folder, stage.fetch(split_data) / "test.parquet", config, model.trust_remote_code)
    summary["model"] = "fine-tuned" if tuned is not None else model.name
    pq.write_table(table, stage.dir / "answers.parquet")
    (stage.dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return stage.commit(meta={k: summary[k] for k in ("n", "exact_match", "similarity_mean")})
