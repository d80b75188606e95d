"""The training sections: `model` (which model to fine-tune) and `train` (the Trainer's settings, LoRA)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import Section

WeightDtype = Literal["float32", "bfloat16", "float16"]
"""model.dtype's values: the torch dtype the base weights load, train and are saved in."""


class ModelConfig(Section):
    """Which causal language model to fine-tune."""

    name: str = Field(
        "smollm2-135m-instruct",
        description="An alias (smollm2-135m-instruct, tiny-neox), a Hugging Face hub id or a local folder.",
    )
    trust_remote_code: bool = Field(
        False, description="Run code shipped with a hub model. Off unless you trust its author."
    )
    dtype: WeightDtype = Field(
        "float32",
        # Left out of the dump (and so of every content key) at float32, so adding this knob did not change the
        # key of any existing run's config.
        exclude_if=lambda value: value == "float32",
        description="The dtype the weights load and train in. float32: full precision (train.dtype may add 16-bit "
        "autocast on top). bfloat16/float16: half the weight memory; full fine-tuning then keeps gradients and "
        "optimizer state in 16-bit too (AdamW's moments take the weights' dtype; Adafactor keeps float32 state), "
        "and an update below about 1/256 of a weight is rounded away, so full 16-bit runs want a larger learning "
        "rate; LoRA and QLoRA adapters train in float32 over the 16-bit base. The saved model is in this dtype. "
        "float16 needs a CUDA GPU and LoRA/QLoRA (its loss scaling needs float32 trainable weights); with "
        "train.method=qlora this is the compute dtype of the 4-bit layers (bfloat16 recommended).",
    )


class LoraConfig(Section):
    """LoRA adapters through peft, used when `train.method` is 'lora'.

    Only small low-rank matrices next to the chosen modules train; the base weights stay
    frozen, so optimizer state and gradients shrink to a fraction of full fine-tuning.
    """

    r: int = Field(8, gt=0, description="Rank of the low-rank update matrices.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input while training.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Names (or name suffixes) of the modules to adapt. Unset: chosen per architecture "
        "(llama, mistral, qwen2, gemma: q_proj, k_proj, v_proj, o_proj; gpt_neox, falcon, bloom: "
        "query_key_value; gpt2: c_attn; otherwise peft's default for the model type).",
    )
    merge: bool = Field(
        True,
        description="Also export the adapter merged into the base weights as model/, which loads with "
        "AutoModelForCausalLM. The adapter alone is always kept in adapter/ (several per base model). "
        "false: adapter/ only; pipeline.models.load_model then loads base + adapter.",
    )


class TrainConfig(Section):
    """Hugging Face Trainer settings: full fine-tuning or LoRA, checkpoints in the store, one or more processes.

    The defaults are the seeds' values (the DeepLearning.AI/Lamini "Finetuning LLMs" course:
    learning rate 1e-5, one epoch, batch size 1, gradient accumulation 4, Adafactor, one
    warm-up step, evaluation and checkpoint every 120 steps, the best checkpoint by eval
    loss at the end, one checkpoint kept, loss logged every step). configs/default.yaml
    sets its own, faster values for the CPU demo.
    """

    method: Literal["full", "lora", "qlora"] = Field(
        "full",
        description="'full': every weight trains; 'lora': adapters only (see train.lora); 'qlora': LoRA over "
        "4-bit (NF4, double-quantised) base weights through bitsandbytes, computing in model.dtype. qlora needs a "
        "CUDA GPU and the qlora extra (pip install -e '.[qlora]'); it is refused before any work "
        "where either is missing.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    epochs: float = Field(1.0, gt=0, description="Passes over the train split; ignored when max_steps is set.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs when set.")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate.")
    batch_size: int = Field(1, gt=0, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(4, gt=0, description="Forward passes per optimizer step.")
    warmup_steps: int = Field(1, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0)
    optim: Literal["adafactor", "adamw_torch", "adamw_torch_fused", "sgd"] = Field(
        "adafactor",
        description="Optimizer name as the Trainer spells it. "
        "adamw_torch_fused: AdamW in one kernel, about 4x faster steps on CPU.",
    )
    eval_steps: int = Field(
        120, gt=0, description="Evaluate on the test split every N optimizer steps (and after the last one)."
    )
    eval_max_rows: int | None = Field(
        256,
        gt=0,
        description="Rows of the test split the eval loss during training runs on: a seeded subset (train.seed), "
        "the same at every evaluation, in file order; null: the whole split. The evaluate stage still answers the "
        "test questions (eval.limit).",
    )
    save_steps: int = Field(
        120,
        gt=0,
        description="Checkpoint every N optimizer steps into the store, for resuming; a multiple of eval_steps.",
    )
    best_model_at_end: bool = Field(
        True, description="Export the checkpoint with the lowest eval loss instead of the last one."
    )
    save_total_limit: int = Field(1, ge=1, description="Checkpoints kept (the best one is kept in addition).")
    logging_steps: int = Field(1, gt=0, description="Log the training loss every N optimizer steps.")
    seed: int = Field(42, description="Seed for initialisation-free randomness: data order, dropout, LoRA init.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Autocast precision of the forward and backward passes (over the weights in model.dtype). "
        "'auto': model.dtype when that is 16-bit; else bfloat16 on a CUDA GPU that supports it, float32 elsewhere. "
        "float16 needs CUDA. With 16-bit weights only 'auto', float32 or the weights' own dtype are accepted.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about 30% slower."
    )
    group_by_length: bool = Field(
        True, description="Batch rows of similar length together (less padding); only matters when batch_size > 1."
    )
    dataloader_num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes. Safe under Prefect: training runs in its own process."
    )
    num_processes: int = Field(1, ge=1, description="Training processes on this machine (DDP; gloo on CPU).")
    launcher: Literal["torchrun", "accelerate"] = Field(
        "torchrun", description="How several processes start: 'torchrun', or 'accelerate' (accelerate launch)."
    )
    accelerate_config: str | None = Field(
        None,
        description="An accelerate config file (FSDP, DeepSpeed, ...) for `accelerate launch`; "
        "implies launcher 'accelerate'.",
    )
    train_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        # Left out of the dump (and so of the train stage's content key) at 1.0, so adding
        # this knob did not change the key of any existing run.
        exclude_if=lambda value: value == 1.0,
        description="Train on this share of the train split: the first ceil(fraction x rows) rows of an order "
        "shuffled with train.seed, so a smaller share is a subset of a larger one (data-size sweeps, flows/sweep.py). "
        "The test split is unchanged.",
    )
    dataset_name: str | None = Field(
        None,
        exclude=True,  # a label for people, never part of the content key
        description="Dataset label in the model's readable alias <dataset>_<steps>_steps_<UTC timestamp>. "
        "Not part of the content key. Unset: 'data'.",
    )

    @model_validator(mode="after")
    def _checkpoints_line_up_with_evaluations(self) -> TrainConfig:
        # The Trainer can only pick the best checkpoint among steps it both evaluated and saved.
        if self.best_model_at_end and self.save_steps % self.eval_steps:
            raise ValueError(
                f"expected save_steps to be a multiple of eval_steps ({self.eval_steps}) when best_model_at_end "
                f"is on, found save_steps={self.save_steps}"
            )
        return self
