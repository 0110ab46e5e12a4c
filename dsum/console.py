"""What a run says on the console, besides its progress bars and the ROUGE table: one line before the
first step (or an evaluation's first batch, or an export), one per validation, and one at the end naming what
went where."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dsum import run_dir
from dsum.config import EvalConfig, Recipe

if TYPE_CHECKING:
    from dsum.batching import BatchPlan


def opening_summary(recipe: Recipe, plan: BatchPlan, total_steps: int, precision: str) -> str:
    """One line before the first step: what is trained on what, in how many steps of how much, where."""
    cfg = recipe.train
    epochs = round(total_steps / plan.steps_per_epoch, 2) if cfg.max_steps else cfg.num_epochs
    method = "full fine-tuning" if recipe.adapter.method == "none" else recipe.adapter.method
    precision = "fp32" if precision == "no" else precision
    return (f"training ({method}, {precision}): {plural(plan.num_examples, 'example')}, {plural(epochs, 'epoch')}, "
            f"{plural(total_steps, 'optimizer step')} ({plan.steps_per_epoch} per epoch), {describe_batch(plan)}; "
            f"writing to {recipe.output_dir}")


def describe_batch(plan: BatchPlan) -> str:
    """The batch of one optimizer step in words: "global batch 64 (8 per device x 2 accumulation steps x
    4 processes)", or under a token budget "micro-batches of up to 4,096 tokens per device x ..."."""
    shape = (f"{plan.per_device_batch_size} per device" if plan.max_tokens is None
             else f"up to {plan.max_tokens:,} tokens per device")
    shape += (f" x {plural(plan.gradient_accumulation_steps, 'accumulation step')} x "
              f"{plural(plan.world_size, 'process')}")
    if plan.max_tokens is not None:
        return f"micro-batches of {shape}"
    return f"global batch {plan.global_batch_size} ({shape})"


def closing_line(output_dir: Path, seconds: float, evaluated: bool) -> str:
    written = [f"the model in {output_dir / run_dir.FINAL}", f"its log in {output_dir / run_dir.METRICS_FILE}",
               f"the run's record in {output_dir / run_dir.RUN_FILE}"]
    if evaluated:
        written.append(f"the evaluation in {output_dir / run_dir.EVAL_DIR}")
    return f"finished in {duration(seconds)}: " + ", ".join(written)


def duration(seconds: float) -> str:
    minutes, hours = round(seconds) // 60, round(seconds) // 3600
    if hours:
        return f"{hours} h {minutes % 60} min"
    return f"{minutes} min {round(seconds) % 60} s" if minutes else f"{seconds:.1f} s"


def plural(count: float, noun: str) -> str:
    return f"{count:g} {noun}" + ("" if count == 1 else "es" if noun.endswith("s") else "s")


def validation_line(step: int, record: dict[str, float], dialogues: int) -> str:
    """The validation loss, and ROUGE where it was measured, as one line."""
    rouge = ", ".join(f"{key.removeprefix('validation_')} {value:.4f}" for key, value in record.items()
                      if key.startswith("validation_rouge"))
    rouge += f" (on {plural(dialogues, 'dialogue')})" if rouge else ""
    return f"step {step}: validation loss {record['validation_loss']:.4f}" + (f", {rouge}" if rouge else "")


def evaluation_summary(e: EvalConfig, model_source: str, dialogues: int, processes: int) -> str:
    """One line before an evaluation generates: which model, on what, how."""
    decoding = ("sampling" if e.do_sample else "greedy" if e.num_beams == 1 else f"beam search ({e.num_beams} beams)")
    return (f"evaluating {model_source} on {e.split}: {dialogues} dialogues, {decoding}, up to {e.max_new_tokens} new "
            f"tokens, batches of {e.batch_size} per process x {plural(processes, 'process')}")


def export_opening(source: Path, what: str, out: Path, how: str) -> str:
    """One line before an export loads anything: which checkpoint, what it holds, how it is written, where."""
    return f"exporting {source}, {what}, {how}, to {out}"


def export_closing(out: Path, seconds: float, loader: str) -> str:
    return f"finished in {duration(seconds)}: the export in {out}, which {loader}.from_pretrained loads without dsum"
