"""The training loop: recipe in, `final/`, checkpoints, `metrics.jsonl` and `run.json` out.

    dsum train recipes/tiny/t5-lora.yaml train.max_steps=20 output_dir=runs/t5
    accelerate launch --config_file accelerate_configs/zero3.yaml -m dsum train RECIPE
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from dsum import checkpoint, cpu_speed, distributed, faults, run_dir, sizing
from dsum.console import opening_summary, validation_line
from dsum.batching import BatchPlan, training_plan
from dsum.compiling import CompiledBlocks
from dsum.config import Recipe, RecipeError, RunError, TrainConfig, check_deepspeed, check_fsdp, recipe_to_dict
from dsum.data import Example, load_split
from dsum.features import Collator, Featurizer, feature_tokens
from dsum.generate import check_generation
from dsum.loss import TokenLoss
from dsum.preemption import StopSignals, Stopped
from dsum.modeling import (check_buildable, check_packing, describe_parameters, load_model, load_tokenizer,
                           logits_for_targets_only, materialize_base, model_config, restore_attention, save_tokenizer,
                           training_attention, warn_of_remote_code)
from dsum.profiling import StepProfiler
from dsum.run_info import MetricsLog, RunInfo, Trackers, launch_info
from dsum.telemetry import (FlopCounter, LogWindow, StepClock, Stretch, device_peak_flops, model_flops,
                            reset_gpu_peaks, telemetry_summary)



def train(recipe: Recipe, *, resume: str | None = None, overwrite: bool = False,
          run_tags: dict[str, Any] | None = None, profile: StepProfiler | None = None,
          timed_from_step: int | None = None) -> Path:
    """Train one recipe and return the directory of its `final/` export; `resume` is None, "latest" or a
    checkpoint; `run_tags` go into run.json; `profile` (dsum.profiling) is told of the end of every optimizer
    step; with `timed_from_step`, run.json's telemetry also holds `after_step`, the figures of the steps after it
    (a benchmark's timed window).

    Training ends at `final/`: with `eval.after_training` the run is left trained but not finished, for
    `evaluate.evaluate_run` to evaluate and finish; without, it is finished here.

    SIGUSR1 or SIGTERM, from the start: save a checkpoint at the next step boundary and raise `Stopped`.
    """
    with StopSignals() as stop, ExitStack() as closing, profile or StepProfiler.off() as profile:
        return _train(recipe, resume, overwrite, run_tags or {}, stop, closing, profile, timed_from_step)


def _train(recipe: Recipe, resume: str | None, overwrite: bool, run_tags: dict[str, Any], stop: StopSignals,
           closing: ExitStack, profile: StepProfiler, timed_from_step: int | None) -> Path:
    """`train()`'s body, read top to bottom: set up, load data and model, prepare, loop over optimizer steps, save.

    The loss of an optimizer step is the mean over every target token of its accumulation window on every rank,
    so 4 micro-batches of 2 on one rank, or 2 ranks with 2 each and 2 steps of accumulation, train exactly as
    one batch of 8.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    output_dir = Path(recipe.output_dir)
    cfg = recipe.train
    warn_of_remote_code(recipe)

    # ---- set up: launch, output directory, seed -------------------------------------------
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        step_scheduler_with_optimizer=False,  # stepped below, once per optimizer step
        kwargs_handlers=distributed.process_group_kwargs(),
    )
    distributed.configure_fsdp(accelerator)
    check_launch(accelerator, recipe)
    cpu_speed.start_run(accelerator.device)
    reset_gpu_peaks(accelerator.device)
    rank, world_size = distributed.rank(), distributed.world_size()
    # ---- everything the user named, read and checked before anything is written ----------------
    train_examples = load_split(recipe.data, recipe.data.train_split)
    val_examples = load_split(recipe.data, recipe.data.validation_split)
    if recipe.eval.after_training:  # a split that is not there is found now, not after training
        load_split(recipe.data, recipe.eval.split)
    resume_from = checkpoint.verified(checkpoint.resolve_resume(output_dir, resume)) if resume is not None else None
    resumed = checkpoint.saved_state(resume_from) if resume_from is not None else {}
    run_dir.check_resumed_recipe(resumed, recipe, resume_from)
    run_dir.check_writable(output_dir)
    # A new run trains its own tokenizer; a resumed one reads the one its run trained.
    tokenizer = load_tokenizer(recipe, output_dir, corpus=lambda: corpus(train_examples), cached=resume_from is not None)
    featurizer = Featurizer(recipe, tokenizer)
    train_features = featurizer.training_features(train_examples)
    truncation = featurizer.stats.as_dict()
    if distributed.is_main() and (truncation["dialogues_truncated"] or truncation["summaries_truncated"]):
        print(f"truncated to fit tokenizer.max_source_length / max_target_length: {truncation['dialogues_truncated']} "
              f"dialogues and {truncation['summaries_truncated']} summaries of {truncation['examples']}", flush=True)
    val_features = Featurizer(recipe, tokenizer).training_features(val_examples)
    config = model_config(recipe, tokenizer)
    check_packing(recipe, config)
    check_buildable(recipe, config)

    # ---- the output directory: held from here to the end, one run in it at a time ------------------
    closing.enter_context(run_dir.claim(output_dir, resuming=resume_from is not None, overwrite=overwrite))
    run = closing.enter_context(RunInfo(output_dir, recipe, accelerator, world_size))  # an error: status failed
    run.start(resumed_from=str(resume_from) if resume_from else None, **run_tags)
    save_tokenizer(recipe, tokenizer, output_dir)
    set_seed(cfg.seed)

    # ---- model, optimizer, schedule --------------------------------------------------------
    source: str | Path | None = recipe.model.name_or_path
    if source is None:
        with distributed.main_first(), zero3_init_disabled(accelerator):
            source = materialize_base(recipe, config, output_dir).resolve()
    attention = training_attention(recipe, accelerator.device.type)
    model = load_model(recipe, source, attention=attention)
    token_loss = TokenLoss(recipe.model.family, targets_only=logits_for_targets_only(model))
    collate = Collator(tokenizer.pad_token_id, config.decoder_start_token_id if recipe.model.family == "seq2seq" else None,
                       packed=cfg.packing, targets_only=token_loss.targets_only, multiple=cfg.padding_multiple)
    compiled = compile_blocks(model) if cfg.compile else None
    fast_dropout = cpu_speed.fast_dropout(model, cfg, accelerator.device, compiled=compiled is not None)
    if recipe.eval.after_training or recipe.eval.validation_samples:  # what generation refuses, refused now
        check_generation(recipe.eval, model, synced_gpus=distributed.shards_weights(accelerator))
    parameters = describe_parameters(model)  # counted before FSDP shards 4-bit weights into plain DTensors
    if distributed.is_main():
        print(parameters, flush=True)
        if fast_dropout is not None and fast_dropout.active:
            print(fast_dropout.describe(), flush=True)
        if compiled is not None:
            print(compiled.describe(), flush=True)
        if attention != recipe.model.attn_implementation:
            print(f"train.packing: attention through {attention}, which keeps packed examples apart without a "
                  "row x row mask", flush=True)
    lengths = [feature_tokens(f, recipe.model.family) for f in train_features]
    budget = token_budget(recipe, accelerator, model, token_loss, collate, train_features, lengths, resumed)
    plan = training_plan(cfg, lengths, world_size, rank, max_tokens=budget)
    total_steps = plan.total_steps(cfg.num_epochs, cfg.max_steps)
    optimizer = build_optimizer(cfg, model, accelerator.device)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    distributed.configure_deepspeed(accelerator, cfg.per_device_batch_size, cfg.gradient_accumulation_steps,
                                    clipping=cfg.max_grad_norm or 0.0)
    distributed.fit_for_fsdp(accelerator, model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # ---- resume ----------------------------------------------------------------------------
    step, state = 0, {}
    if resume_from is not None:
        state = checkpoint.load_checkpoint(accelerator, resume_from)
        check_resumable(state, plan)
        step = state["global_step"]
        if distributed.is_main():
            print(f"resumed from {resume_from} at step {step}", flush=True)

    metrics = MetricsLog(output_dir, keep_through_step=step)
    run.update(total_steps=total_steps, global_batch_size=plan.global_batch_size, steps_per_epoch=plan.steps_per_epoch,
               num_train_examples=plan.num_examples, truncation=truncation, parameters=parameters,
               launch=launch_info(accelerator),  # now with DeepSpeed's filled-in config
               attention=attention,  # None: transformers' own choice
               max_tokens_per_batch=budget)
    trackers = Trackers(output_dir, recipe)
    if distributed.is_main():
        print(opening_summary(recipe, plan, total_steps, accelerator.mixed_precision), flush=True)

    # ---- loop ------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not distributed.is_main(), dynamic_ncols=True)
    model.train()
    window_log = LogWindow(accelerator.device, FlopCounter(accelerator.unwrap_model(model)),
                           state.get("log_window") if resume is not None else None)
    peak_flops = device_peak_flops(accelerator.device)
    guard = NonFiniteGuard(cfg.on_nonfinite_loss, accelerator.device, state.get("skipped_steps", 0))
    clock = StepClock(accelerator.device)
    seen = {"real_tokens": 0.0, "processed_tokens": 0.0, "flops": 0.0}  # over the whole loop, for the summary in run.json
    set_aside = 0.0  # seconds the loop spent validating and saving checkpoints: not training, not in the rates
    stretch = None  # from timed_from_step to the end
    started = last_log = time.perf_counter()
    # Between logging steps nothing is read back from the device (counts come from the host, the loss
    # and gradient norm stay on the device until logged), so the host queues a step's work and goes on
    # to collate the next window while the device computes.
    while step < total_steps:
        clock.start()
        epoch, index = plan.locate(step)
        window = plan.windows(epoch)[index]
        batches = [collate.batch([train_features[i] for i in ids]) for ids in window]

        # Normalise by the window's target tokens on every rank, so the update is a per-token mean.
        local_targets = sum(b.targets for b in batches)
        # The same all-reduce (on the host) carries every rank's vote to stop, so all ranks stop at the same step.
        global_targets, stop_votes = distributed.sum_all([local_targets, stop.vote()])
        if stop_votes:
            break
        # Accelerate divides by gradient_accumulation_steps and DDP/DeepSpeed average over ranks: undo both.
        scale = cfg.gradient_accumulation_steps * world_size / global_targets
        # A short last window starts Accelerate's micro-step counter part-way, so that it still syncs.
        accelerator.step = cfg.gradient_accumulation_steps - len(batches)
        grad_norm, skip = None, False
        window_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for batch in batches:
            inputs = batch.to(accelerator.device)
            clock.lap("data")
            with accelerator.accumulate(model):
                loss_sum = faults.poisoned(token_loss(model, inputs, cfg.label_smoothing), "train.loss", step + 1)
                accelerator.backward(loss_sum * scale)
                window_loss += loss_sum.detach()
                clock.lap("forward_backward")
                if accelerator.sync_gradients:
                    skip = guard.skips(window_loss)
                    grad_norm = None if skip else clip_gradients(accelerator, model, cfg.max_grad_norm)
                if not skip:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                clock.lap("optimizer")
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step's update took, logged with its loss
        scheduler.step()
        step += 1
        run.stepped()
        progress.update(1)
        faults.point("train.step", step)
        guard.note(window_loss, step)
        if not skip:
            window_log.add(window_loss, batches)

        if step % cfg.logging_steps == 0 or step == total_steps:
            loss_total, targets, real_tokens, processed, flops = window_log.totals()
            now = time.perf_counter()
            seconds = now - last_log  # training time since the last log (validation and saves moved last_log on)
            seen["real_tokens"] += real_tokens
            seen["processed_tokens"] += processed
            seen["flops"] += flops
            record = {
                "step": step,
                "epoch": round(plan.epochs_done(step), 4),
                "loss": loss_total / max(targets, 1),
                "learning_rate": learning_rate,
                "grad_norm": None if grad_norm is None else float(grad_norm),  # read from the device here
                "tokens_per_second": real_tokens / seconds,
                "processed_tokens_per_second": processed / seconds,
                "padding_efficiency": real_tokens / max(processed, 1),
                **model_flops(flops, seconds, peak_flops, world_size),
                "elapsed_seconds": now - started,
                **clock.read(),
                **({"compiled_graphs": compiled.graphs} if compiled is not None else {}),
            }
            if guard.skipped:
                record["skipped_steps"] = guard.skipped
            metrics.write(record)
            trackers.log(record, step)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            if not math.isfinite(record["loss"]):
                guard.check(run)
            window_log.reset()
            last_log = now

        validating = bool(cfg.eval_steps) and step % cfg.eval_steps == 0 and step < total_steps
        saving = bool(cfg.save_steps) and step % cfg.save_steps == 0 and step < total_steps
        if validating or saving:
            aside_from = time.perf_counter()
            if validating:
                with eager(compiled):
                    record = validate(model, tokenizer, val_examples, val_features, collate, token_loss, recipe,
                                      accelerator)
                metrics.write({"step": step, "epoch": round(plan.epochs_done(step), 4), **record})
                trackers.log(record, step)
                if distributed.is_main():
                    progress.write(validation_line(step, record, len(val_examples[: recipe.eval.validation_samples])))
            if saving:
                guard.check(run)  # never save weights a non-finite loss has reached
                checkpoint.save_checkpoint(accelerator, output_dir,
                                           trainer_state(step, plan, recipe, window_log, guard.skipped),
                                           cfg.save_total_limit)
            aside = time.perf_counter() - aside_from
            last_log += aside  # the next logged rates count training time alone
            set_aside += aside
        profile.step()
        if step == timed_from_step and step < total_steps:
            stretch = Stretch(step, seen, window_log.totals(), set_aside)
    progress.close()
    loop_ended = time.perf_counter()
    loop_seconds = loop_ended - started
    if fast_dropout is not None:
        fast_dropout.remove()  # the model is saved as it was loaded
    if attention != recipe.model.attn_implementation:
        restore_attention(accelerator.unwrap_model(model))  # generation takes transformers' own
    guard.check(run)
    if step < total_steps:  # stopped by a signal
        stop_after_signal(accelerator, output_dir, trainer_state(step, plan, recipe, window_log, guard.skipped), cfg,
                          run, stop)

    # ---- save ------------------------------------------------------------------------------
    with eager(compiled):
        record = validate(model, tokenizer, val_examples, val_features, collate, token_loss, recipe, accelerator)
    metrics.write({"step": step, "epoch": round(plan.epochs_done(step), 4), **record})
    trackers.log(record, step)
    if distributed.is_main():
        print(validation_line(step, record, len(val_examples[: recipe.eval.validation_samples])), flush=True)
    final = checkpoint.save_final(accelerator, model, tokenizer, output_dir)
    # Trained: a stop or a kill from here on leaves the evaluation alone to do (run_dir.auto_resume).
    run.update(trained=True, steps=step, seconds=time.perf_counter() - started,
               validation_loss=record["validation_loss"], skipped_steps=guard.skipped,
               telemetry=telemetry_summary(seen, loop_seconds, set_aside, clock, peak_flops, world_size)
               | ({"after_step": stretch.summary(step, seen, loop_ended, set_aside, peak_flops, world_size)}
                  if stretch is not None else {})
               | ({"compiled_graphs": compiled.graphs} if compiled is not None else {}))
    if not recipe.eval.after_training:  # else evaluate.evaluate_run finishes it
        run.finish()
    trackers.finish()
    accelerator.free_memory()  # the engine, optimizer and model go with this function: the evaluation loads final/
    return final


def stop_after_signal(accelerator, output_dir: Path, state: dict[str, Any], cfg: TrainConfig, run: RunInfo,
                      stop: StopSignals) -> None:
    """Save a checkpoint at this step boundary (unless one was just saved), record it, and stop."""
    step = state["global_step"]
    path = run_dir.checkpoint_path(output_dir, step)
    if step > 0 and not (path / run_dir.MARKER).is_file():  # not at the start, nor just saved or resumed
        path = checkpoint.save_checkpoint(accelerator, output_dir, state, cfg.save_total_limit)
    run.update(status="stopped", stopped_at_step=step, stopped_by=stop.by)
    saved = f"checkpoint {path}; continue with --resume latest (or auto)" if step > 0 else "nothing to save yet"
    raise Stopped(f"stopped on {stop.by} at step {step}; {saved}", by=stop.by)


def validate(model, tokenizer, examples, features, collate, token_loss: TokenLoss, recipe: Recipe,
             accelerator) -> dict[str, float]:
    """Validation loss, and ROUGE on the first eval.validation_samples dialogues with the evaluation's generator."""
    record = {"validation_loss": validation_loss(model, features, collate, token_loss, recipe, accelerator)}
    if recipe.eval.validation_samples:
        from dsum.evaluate import validation_rouge

        record.update(validation_rouge(recipe, accelerator.unwrap_model(model), tokenizer,
                                       examples[: recipe.eval.validation_samples], accelerator))
        model.train()
    return record


@torch.no_grad()
def validation_loss(model, features, collate, token_loss: TokenLoss, recipe: Recipe, accelerator) -> float:
    """Mean token loss over the validation split (or its first eval_max_batches per rank), all ranks."""
    cfg = recipe.train
    plan = BatchPlan(len(features), cfg.per_device_batch_size, 1, distributed.world_size(), distributed.rank(),
                     cfg.seed, shuffle=False)
    batches = plan.micro_batches(0)[: cfg.eval_max_batches]
    model.eval()
    loss, targets = torch.zeros((), dtype=torch.float64, device=accelerator.device), 0
    for ids in batches:
        batch = collate.batch([features[i] for i in ids])
        loss += token_loss(model, batch.to(accelerator.device))
        targets += batch.targets
    model.train()
    loss, targets = distributed.sum_all([loss.item(), targets])
    return loss / max(targets, 1)


def clip_gradients(accelerator, model, max_norm: float | None) -> torch.Tensor | float | None:
    """Clip to `max_norm` (None: only measure) and give back the norm before clipping, left where it is
    (on the device) until a logging step reads it. None where DeepSpeed clips and reports nothing."""
    return accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm is not None else float("inf"))


def build_optimizer(cfg: TrainConfig, model, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # Biases and norms take no weight decay. ZeRO-3 flattens parameters; ds_shape keeps the real shape.
    decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
    groups = [{"params": group, "weight_decay": wd}
              for group, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if group]
    adam = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if cfg.optimizer == "adamw":
        # One fused kernel for all the parameters (a CPU has one too), instead of a loop over them.
        return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"), **adam)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    import bitsandbytes as bnb

    optimizer_class = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[cfg.optimizer]
    return optimizer_class(groups, **adam)


def build_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    """A linear warm-up, then linear decay to 0, half a cosine, or constant: the multipliers of
    transformers' get_scheduler("linear" | "cosine" | "constant_with_warmup") (the tests compare them).
    Written here because transformers' come with its Trainer's utilities, which import peft and
    bitsandbytes: seconds at the start of every process that needs neither."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    decay = max(1, total_steps - warmup)
    after_warmup = {
        "linear": lambda step: max(0.0, (total_steps - step) / decay),
        "cosine": lambda step: max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / decay))),
        "constant": lambda step: 1.0,
    }[cfg.lr_scheduler]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: step / max(1, warmup) if step < warmup else after_warmup(step))


def check_launch(accelerator, recipe: Recipe) -> None:
    """Accelerate must see every launched process, gradient accumulation comes from the recipe alone,
    and the ZeRO stage or FSDP must suit the recipe."""
    cfg = recipe.train
    if accelerator.num_processes != distributed.world_size():
        raise RecipeError(
            f"the launcher started {distributed.world_size()} processes but Accelerate sees {accelerator.num_processes}; "
            "the ranks would train apart (on a CPU, set ACCELERATE_USE_CPU=true for DDP and FSDP)"
        )
    if distributed.fsdp(accelerator):
        check_fsdp(recipe, accelerator.state.fsdp_plugin.fsdp_version)
    if accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
        raise RecipeError(
            f"train.gradient_accumulation_steps is {cfg.gradient_accumulation_steps} but the Accelerate launch sets "
            f"{accelerator.gradient_accumulation_steps}; remove gradient_accumulation_steps from the Accelerate config"
        )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        configured = plugin.deepspeed_config.get("gradient_accumulation_steps", "auto")
        if configured not in ("auto", cfg.gradient_accumulation_steps):
            raise RecipeError(
                f"train.gradient_accumulation_steps is {cfg.gradient_accumulation_steps} but the DeepSpeed config sets "
                f"{configured}; set it to auto there"
            )
        check_deepspeed(recipe, plugin.zero_stage)


def token_budget(recipe: Recipe, accelerator, model, token_loss: TokenLoss, collate: Collator, features, lengths,
                 resumed: dict[str, Any]) -> int | None:
    """train.max_tokens_per_batch as a number: the recipe's; for auto, a resumed checkpoint's (its
    batches are cut as before) or the largest that fits the device (dsum/sizing.py)."""
    cfg = recipe.train
    if cfg.max_tokens_per_batch != "auto":
        return cfg.max_tokens_per_batch
    if "max_tokens_per_batch" in resumed:
        budget, how = resumed["max_tokens_per_batch"], "the checkpoint's, to cut the batches as before"
    elif sizing.device_memory(accelerator.device):
        if not getattr(model, "is_quantized", False):  # a 4-bit base is placed on the GPU as it loads
            model.to(accelerator.device)
        budget = sizing.probe(model, token_loss, collate, features, lengths, optimizer=cfg.optimizer,
                              device=accelerator.device, autocast=accelerator.autocast, multiple=cfg.padding_multiple)
        how = f"the largest that fitted the {accelerator.device.type} in trials, less {1 - sizing.MARGIN:.0%}"
    else:
        budget = sizing.mean_budget(lengths, cfg.per_device_batch_size, cfg.padding_multiple)
        how = f"no device memory to size against: {cfg.per_device_batch_size} examples' worth on average"
    if distributed.is_main():
        print(f"train.max_tokens_per_batch: auto: {budget:,} tokens a micro-batch ({how})", flush=True)
    return budget


def compile_blocks(model) -> CompiledBlocks:
    try:
        return CompiledBlocks(model)
    except ValueError as err:
        raise RecipeError(f"train.compile: {err}; set train.compile: false") from None


def eager(compiled: CompiledBlocks | None):
    """The model's blocks uncompiled inside the block (validation, generation), if they were compiled."""
    return compiled.eager() if compiled is not None else nullcontext()


@contextmanager
def zero3_init_disabled(accelerator):
    """Build a random base whole, not partitioned, so that rank 0 alone can save it for all to load."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or getattr(plugin, "dschf", None) is None:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # transformers partitions every model built while a ZeRO-3 config is registered
    try:
        yield
    finally:
        set_hf_deepspeed_config(plugin.dschf)


class NonFiniteGuard:
    """A NaN or infinite loss. `stop`: the first such step is noted on the device (no sync per step), and
    `check()`, before every save and whenever a logged loss is not finite, stops the run with it.
    `skip`: the ranks agree at every optimizer step (one sync) and drop the update of a bad one."""

    def __init__(self, mode: str, device: torch.device, skipped: int = 0):
        self.mode = mode
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.skipped = skipped

    def skips(self, window_loss: torch.Tensor) -> bool:
        """At the last micro-batch of a window: drop its update? Only in skip mode, where it costs a sync."""
        if self.mode != "skip":
            return False
        (bad_ranks,) = distributed.sum_all([float(not torch.isfinite(window_loss).item())])
        self.skipped += bool(bad_ranks)
        return bool(bad_ranks)

    def note(self, window_loss: torch.Tensor, step: int) -> None:
        if self.mode == "stop":
            bad = (self.first_bad < 0) & ~torch.isfinite(window_loss)
            self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, run: RunInfo) -> None:
        """Stop with the first step whose loss was not finite, on any rank."""
        if self.mode != "stop":
            return
        local = int(self.first_bad.item())
        first = distributed.min_all(local if local >= 0 else math.inf)
        if math.isfinite(first):
            run.update(status="failed", failed_at_step=int(first), failure="non-finite loss")
            raise RunError(f"the loss was not finite at step {int(first)}; training stopped, and the last "
                           "checkpoint before it is kept; lower train.learning_rate, or set "
                           "train.on_nonfinite_loss=skip to skip such steps")


def trainer_state(step: int, plan: BatchPlan, recipe: Recipe | None = None, window_log: LogWindow | None = None,
                  skipped: int = 0) -> dict[str, Any]:
    """What a checkpoint records besides the weights: the step, the batch layout it needs, the log window,
    and the recipe it trained with (`run_dir.check_resumed_recipe`)."""
    # The settings that shape the layout come first, so a mismatch names the one that moved.
    budget = {"max_tokens_per_batch": plan.max_tokens} if plan.max_tokens is not None else {}  # older checkpoints: none
    if plan.max_tokens is not None and plan.multiple != 1:  # rounded lengths cut the budget's batches elsewhere
        budget["pad_to_multiple_of"] = plan.multiple
    layout = {
        "global_step": step,
        **budget,
        "world_size": plan.world_size,
        "per_device_batch_size": plan.per_device_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "num_examples": plan.num_examples,
        "seed": plan.seed,
        "steps_per_epoch": plan.steps_per_epoch,
    }
    if window_log is None:
        return layout
    return {**layout, "log_window": window_log.totals(), "skipped_steps": skipped, "recipe": recipe_to_dict(recipe)}


def check_resumable(state: dict[str, Any], plan: BatchPlan) -> None:
    """The data order is only the same if the batch layout is; say which setting moved."""
    now = trainer_state(state["global_step"], plan)
    for key, value in now.items():
        if state.get(key) != value:
            raise RecipeError(f"--resume: the checkpoint was made with {key}={state.get(key)}, this run has {value}; "
                              "resume with the same recipe and number of processes")


def corpus(examples: list[Example]):
    for example in examples:
        yield example.dialogue
        yield from example.references
