"""The planner's training estimate is within 25% of the peak measured when the pipeline's own
training runs the tiny and the default model on this CPU (a few steps each, in a subprocess)."""

import pytest

from finetune.probe import probe_training
from pipeline.planner import TrainingSetup, estimate_training, model_shape

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "model, setup",
    [
        ("tiny-neox", TrainingSetup(method="full", batch_size=8, seq_len=96, optimizer="adamw")),
        ("smollm2-135m-instruct", TrainingSetup(method="full", batch_size=4, seq_len=128, optimizer="adamw")),
    ],
    ids=["tiny-neox", "smollm2-135m"],
)
def test_training_estimate_is_within_25_percent_of_the_measured_peak(model, setup):
    measured = probe_training(model, setup, steps=2)
    estimated = estimate_training(model_shape(model), setup).total
    assert abs(estimated / measured.peak_bytes - 1) < 0.25, (estimated, measured)
    assert measured.tokens_per_second > 0
