"""Will it fit? Memory estimates for inference and fine-tuning from a model's config alone, plus a probe for time.

In: a model (an alias such as `smollm2-135m-instruct`, a hub id, a local folder, a
`config.json` path or a transformers config object) and a `TrainingSetup` (method,
batch size, sequence length, optimizer, precision, gradient checkpointing, LoRA rank).
Out: a `Plan`: bytes per component for inference and for training, whether each fits a
device, and, when training does not, what each change would give and the fewest changes
that make it fit. No weights are loaded: the model is built on PyTorch's meta device
(shapes, no storage), so a laptop answers for a 7B model in seconds.

The estimates (all in bytes; P = parameters, T = trainable parameters, n = batch x
sequence tokens, L = layers, h = hidden size, I = MLP intermediate size, a = heads,
s = sequence length, V = vocabulary):

* weights: P x 4 (float32 and mixed precision keep float32 weights; mixed adds the
  16-bit copies autocast makes, 2 more bytes per parameter) or P x 2 (16-bit weights, the
  pipeline's `model.dtype=bfloat16`; precision 'mixed' is `train.dtype=bfloat16` over float32);
* gradients: T x the weight bytes (float32 for mixed precision);
* optimizer state: AdamW two moments (8 bytes per trainable parameter in float32, 4 when
  the weights themselves are 16-bit, because torch keeps the moments in the parameter's
  dtype; 2 for 8-bit AdamW); Adafactor a factored second moment, rows + columns per
  matrix (computed from the real parameter shapes); SGD none (4 bytes with momentum);
* activations: what autograd saves for the backward pass, per layer and token
  `9h + 4I` values for a gated MLP (SwiGLU: Llama, Mistral, Qwen, Gemma) or `9h + 2I`
  for a plain one (GPT-2, GPT-NeoX), plus `2as` with eager (non-fused) attention; times
  L x n x 2 bytes (16-bit compute) or 4 (float32). For a GPT block (I = 4h) in 16-bit
  this is `34 s b h` bytes per layer, the estimate of Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models"), whose `5 a s^2 b`
  term only applies to eager attention. The counts were checked against the tensors
  autograd saves (torch.autograd.graph.saved_tensors_hooks) for Llama and GPT-NeoX:
  within 6% (tests/unit/test_planner.py). Gradient checkpointing keeps each layer's input (L x n x h) plus
  one layer's full activations while it is recomputed;
* logits: n x V x 4 x 3: the loss runs in float32 and, at the start of the backward
  pass, the logits, their log-softmax and its gradient are alive together (measured:
  3.0 copies per token on the tiny model, where logits dominate).

Training peaks at one of two moments, and the estimate is the larger: the start of the
backward pass (weights + optimizer state + activations + logits + the output layer's
gradient, the first one computed) or the optimizer step (weights + gradients + optimizer
state + its temporaries: torch's multi-tensor AdamW makes one more state-sized copy). In
between, each layer's activations are freed as its gradients are allocated. Inference = weights +
KV cache (2 x L x kv-heads x head-dim x s x b) + one layer's working activations + the last
position's logits. `reserve` (default 10%) of the device stays free for the CUDA context, the
caching allocator and fragmentation.

Time: `finetune.probe.probe_training` trains the model for a few steps on this machine
through the pipeline's own training code (tasks/train/) on fixed-length random rows and
reports the measured peak memory and non-padding tokens per second; it lives with the
entry points, above the stages it runs, so this package stays below them.

Modules: `units` (memory sizes parsed and formatted), `shape` (the model's sizes from the meta device), `setup`
(`TrainingSetup`), `estimates` (bytes per component for training and inference), `plan` (fitting a device and
the changes that would) and `errors` (`PlannerError`). This module re-exports their public names.
"""

from __future__ import annotations

from pipeline.planner.errors import PlannerError
from pipeline.planner.estimates import (
    LOGIT_COPIES,
    MemoryEstimate,
    activation_values_per_token,
    compute_bytes,
    estimate_inference,
    estimate_training,
    lora_modules,
    optimizer_state_bytes,
    trainable_parameters,
    update_temporary_bytes,
    weight_bytes,
)
from pipeline.planner.plan import (
    CHANGES,
    DEFAULT_RESERVE,
    Change,
    Option,
    Plan,
    format_plan,
    make_plan,
    plan_as_json,
)
from pipeline.planner.setup import (
    OPTIMIZER_ALIASES,
    OPTIMIZERS,
    PRECISIONS,
    Attention,
    Method,
    Optimizer,
    Precision,
    TrainingSetup,
)
from pipeline.planner.shape import LinearShape, ModelShape, load_model_config, model_shape
from pipeline.planner.units import format_bytes, parse_memory

__all__ = [
    "CHANGES",
    "DEFAULT_RESERVE",
    "LOGIT_COPIES",
    "OPTIMIZERS",
    "OPTIMIZER_ALIASES",
    "PRECISIONS",
    "Attention",
    "Change",
    "LinearShape",
    "MemoryEstimate",
    "Method",
    "ModelShape",
    "Optimizer",
    "Option",
    "Plan",
    "PlannerError",
    "Precision",
    "TrainingSetup",
    "activation_values_per_token",
    "compute_bytes",
    "estimate_inference",
    "estimate_training",
    "format_bytes",
    "format_plan",
    "load_model_config",
    "lora_modules",
    "make_plan",
    "model_shape",
    "optimizer_state_bytes",
    "parse_memory",
    "plan_as_json",
    "trainable_parameters",
    "update_temporary_bytes",
    "weight_bytes",
]
