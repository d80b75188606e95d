"""The training job: what the train stage hands a training process, as `job.json`.

In: nothing; out: `TrainJob`, a frozen pydantic model. Kept apart from `process` so the stage can write a job
without importing torch and transformers, which only the training process needs.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from pipeline.config import TemplateConfig, TrainConfig
from pipeline.config.training import WeightDtype
from pipeline.store import StoreSettings


class TrainJob(BaseModel):
    """Everything a training process needs, written to job.json by the task.

    Store credentials are never part of it: they reach the process in its environment.
    """

    model_config = ConfigDict(frozen=True)

    base_folder: str
    base_spec: str
    trust_remote_code: bool = False
    weights: WeightDtype = "float32"
    """model.dtype: what the base weights load, train and are saved in."""
    split_dir: str
    out_dir: str
    work_dir: str
    config: TrainConfig
    template: TemplateConfig = TemplateConfig()
    store: StoreSettings | None = None
    checkpoint_prefix: str | None = None
    save_model: bool = True
    """False: train and write the report only, no model (the planner's probe measures a run and keeps nothing)."""
