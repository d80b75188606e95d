"""Batched greedy generation: prompts sorted by length, padded on the left, answers cut at the first stop token."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.progress import Progress


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS (what training appends) plus any EOS the model's generation config names."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every sequence right-aligned, so all end where generation starts."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids) :] = 1
    return input_ids, mask


def cut_at_stop(ids: Sequence[int], stops: set[int]) -> list[int]:
    """The tokens before the first stop token (all of them when none occurs)."""
    for position, token in enumerate(ids):
        if token in stops:
            return list(ids[:position])
    return list(ids)


def prompt_room(model: PreTrainedModel, max_new_tokens: int) -> int | None:
    """Most prompt tokens that still leave room for the answer in the model's context (None: no limit known)."""
    context = getattr(model.config, "max_position_embeddings", None)
    return max(1, context - max_new_tokens) if context else None


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    repetition_penalty: float | None = None,
) -> list[str]:
    """Greedy answers for `prompts`, in the prompts' order.

    Prompts are tokenized without special tokens (as the tokenize stage does), cut
    from the left when they would not leave `max_new_tokens` of context, sorted by
    token count and generated `batch_size` at a time with left padding. Each answer
    is the decoded tokens after its prompt up to the first stop token, stripped. No prompts, no answers.
    """
    if not prompts:  # the tokenizer cannot encode an empty batch (an evaluation without probes asks none)
        return []
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    room = prompt_room(model, max_new_tokens)
    if room is not None:
        encoded = [ids[-room:] for ids in encoded]  # keep the end: the question and "Answer:" cue
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    answers: list[str] = [""] * len(encoded)
    model.eval()  # no dropout: greedy answers must not depend on the RNG
    progress = Progress("generate answers", len(order), unit="answers")
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        input_ids, mask = left_pad([encoded[i] for i in indices], pad_id)
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,  # clear sampling settings a generation_config may carry, so greedy is clean
                top_p=None,
                top_k=None,
                repetition_penalty=repetition_penalty,
                pad_token_id=pad_id,
                eos_token_id=stops,
            )
        for index, ids in zip(indices, output[:, input_ids.shape[1] :].tolist()):
            answers[index] = tokenizer.decode(cut_at_stop(ids, set(stops)), skip_special_tokens=True).strip()
        progress.advance(len(indices))
    progress.finish()
    return answers
