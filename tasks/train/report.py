"""The training report: its figures (`report.json`), the loss plot (`loss.png`) and its markdown for the UI."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import TrainConfig

if TYPE_CHECKING:  # only annotations: the train stage reads this module's names without training
    from transformers import Trainer

    from tasks.train.trainer import TokenMeter

REPORT_FILE = "report.json"


LOSS_PLOT_FILE = "loss.png"


def build_report(
    trainer: Trainer,
    config: TrainConfig,
    meter: TokenMeter,
    *,
    real: int,
    padded: int,
    wall: float,
    peak: tuple[int, str],
    test_loss: float,
    model_bytes: int,
    device: str,
    precision: str,
    resumed_from: int | None,
    mean_train_loss: float,
) -> dict[str, Any]:
    """The training report: sizes, throughput, memory and losses (JSON-ready)."""
    state, model = trainer.state, trainer.model
    history = [{"step": e["step"], "loss": e["loss"]} for e in state.log_history if "loss" in e]
    evals = [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in state.log_history if "eval_loss" in e]
    seconds = sum(meter.step_seconds)
    steps = state.global_step
    return {
        "method": config.method,
        "device": device,
        "precision": precision,
        "processes": trainer.args.world_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "model_memory_bytes": model_bytes,
        "lora": config.lora.model_dump(mode="json") if config.method in ("lora", "qlora") else None,
        "steps": steps,
        "epochs": round(state.epoch or 0.0, 3),
        "train_rows": len(trainer.train_dataset),
        "examples_seen": steps * config.batch_size * config.gradient_accumulation_steps * trainer.args.world_size,
        "resumed_from_step": resumed_from,
        "flops_per_optimizer_step": state.total_flos / steps if steps else None,
        "non_padding_tokens": real,
        "padded_tokens": padded,
        "padding_share": round(1 - real / padded, 4) if padded else 0.0,
        "tokens_per_second": round(real / seconds, 1) if seconds else None,
        "training_seconds": round(seconds, 2),
        "wall_seconds": round(wall, 2),
        "peak_memory_bytes": peak[0],
        "peak_memory_kind": peak[1],
        "first_loss": history[0]["loss"] if history else None,
        "final_train_loss": history[-1]["loss"] if history else None,
        "mean_train_loss": mean_train_loss,
        "test_loss": test_loss,
        "best_step": state.best_global_step or None,
        "loss_history": history,
        "eval_history": evals,
        "step_seconds": [round(s, 4) for s in meter.step_seconds],
        "step_tokens": meter.step_tokens,
        "step_padded_tokens": meter.step_padded,
    }


def plot_loss(history: list[dict], evals: list[dict], best_step: int | None, path: Path) -> None:
    """Save the train-loss curve with the eval losses (and the exported step) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no screen here, and none needed
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([e["step"] for e in history], [e["loss"] for e in history], label="train loss")
    if evals:
        axis.plot(
            [e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", color="tab:orange", label="eval loss"
        )
    if best_step:
        axis.axvline(best_step, color="tab:green", linestyle=":", label=f"exported (step {best_step})")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def report_markdown(report: dict, plot_png: bytes | None, alias: str, uri: str) -> str:
    """Markdown for the Prefect UI: the report's figures and the loss curve embedded as a data: URI.

    The UI renders markdown images with a plain <img src>, so the plot shows without
    any file server.
    """
    gib = 1024**3
    rows = [
        ("model", f"`{alias}` (`{uri}`)"),
        (
            "method / device / precision",
            f"{report['method']} / {report['device']} x{report['processes']} / {report['precision']}",
        ),
        ("parameters (trainable)", f"{report['parameters']:,} ({report['trainable_parameters']:,})"),
        ("model memory", f"{report['model_memory_bytes'] / gib:.2f} GiB"),
        (
            "steps / examples seen",
            f"{report['steps']} / {report['examples_seen']}"
            + (f" (resumed at step {report['resumed_from_step']})" if report.get("resumed_from_step") else ""),
        ),
        (
            "FLOPs per optimizer step",
            f"{report['flops_per_optimizer_step']:.3g}" if report["flops_per_optimizer_step"] else "-",
        ),
        ("non-padding tokens / s", report["tokens_per_second"]),
        ("padding share", f"{report['padding_share']:.1%}"),
        ("wall time (training steps)", f"{report['wall_seconds']} s ({report['training_seconds']} s)"),
        ("peak memory", f"{report['peak_memory_bytes'] / gib:.2f} GiB ({report['peak_memory_kind']})"),
        ("train loss first -> last", f"{report['first_loss']:.3f} -> {report['final_train_loss']:.3f}"),
        (
            "eval loss (exported model)",
            f"{report['test_loss']:.3f}" + (f" at step {report['best_step']}" if report.get("best_step") else ""),
        ),
    ]
    text = "## Training\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if plot_png:
        text += f"\n\n![loss curve](data:image/png;base64,{base64.b64encode(plot_png).decode('ascii')})\n"
    return text
