"""The `dsum` command: parses arguments, then calls one function per sub-command, and turns what went wrong
into one line and an exit status."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from importlib import resources
from pathlib import Path

from dsum.config import Recipe, RecipeError, RunError, load_recipe
from dsum.preemption import Stopped

EXIT_USAGE = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130  # as a shell reports a process ended by Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """Errors in what the user gave (recipe, overrides, data, output directory) print one line and exit 2; a run
    that cannot go on (a non-finite loss, a failed save) prints one line and exits 1."""
    quiet_libraries()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options too (`--resume latest train.max_steps=8`).
    unknown = [word for word in extra if word.startswith("-") or "=" not in word or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except RecipeError as err:
        return report(f"dsum: error: {err}", EXIT_USAGE)
    except RunError as err:  # the run cannot go on; what was saved is kept
        return report(f"dsum: error: {err}", EXIT_RUN_FAILED)
    except Stopped as stopped:  # SIGUSR1 / SIGTERM / Ctrl-C: progress is saved, and the same command continues
        from dsum import distributed

        return report(f"dsum: {stopped}", 0) if distributed.is_main() else 0
    except KeyboardInterrupt:  # Ctrl-C twice, or outside a run's steps: what was saved stays
        return report("dsum: interrupted; what was saved before stays (a run continues with --resume latest)",
                      EXIT_INTERRUPTED)


def report(message: str, status: int) -> int:
    """Print the one line last, after any progress bar the error cut short, in one write: the lines of ranks
    that fail together never interleave."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):
        bar.close()
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    return status


def build_parser() -> argparse.ArgumentParser:
    """The sub-commands, in short:

        dsum train RECIPE [key.sub=value ...] [--resume [PATH|latest|auto]] [--overwrite]
        dsum validate RECIPE [key.sub=value ...] [--num-processes N]
        dsum eval RECIPE [key.sub=value ...] [--checkpoint DIR] [--base NAME_OR_DIR] [--output-dir DIR] [--overwrite] ...
        dsum export RUN_OR_CHECKPOINT --out DIR [--merge] [--dtype bf16|fp16|fp32] [--base NAME_OR_DIR] [--overwrite]
        dsum score --predictions FILE [--references FILE] [--prediction-field F] [--reference-field F ...] [--json]
        dsum compare RUN_OR_EVAL_DIR ... [--out DIR] [--samples K]
        dsum submit RECIPE --nodes N --gpus-per-node G [--job train|eval] [--accelerate NAME] [--time T] [--dry-run] ...
        dsum demo [--output-dir DIR]
        dsum bench [--goals] [--device cpu|cuda] [--data DIR] [--json FILE|--record] [--models A,B] [--profile DIR] ...
        dsum bench --table
    """
    from dsum import __version__

    parser = argparse.ArgumentParser(prog="dsum", description="Fine-tune and evaluate dialogue summarization models.")
    parser.add_argument("--version", action="version", version=f"dsum {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe")
    add_recipe_arguments(train)
    train.add_argument("--resume", nargs="?", const="latest", metavar="PATH|latest|auto",
                       help="continue from a checkpoint directory, or the newest complete one (default: latest); "
                            "auto: continue if there is a checkpoint, start if there is no run, do nothing if it finished")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    train.set_defaults(run=run_train)

    validate = sub.add_parser("validate", help="check a recipe and show what training would do, without training")
    add_recipe_arguments(validate)
    validate.add_argument("--num-processes", type=int, default=None,
                          help="processes the run will launch with (default: this launch's, or 1)")
    validate.set_defaults(run=run_validate)

    evaluate = sub.add_parser("eval", help="generate and score a model on eval.split")
    add_recipe_arguments(evaluate)
    evaluate.add_argument("--checkpoint", type=Path, metavar="DIR",
                          help="any checkpoint, from any directory: a run (its final/), final/ or checkpoints/step-N, "
                               "full model or adapter; default: the recipe's base model, zero-shot")
    evaluate.add_argument("--base", metavar="NAME_OR_DIR",
                          help="the base --checkpoint's adapter goes onto (default: the one it was trained on)")
    evaluate.add_argument("--output-dir", type=Path, metavar="DIR",
                          help="default: the run's eval/ for its final/, eval/step-N for a checkpoint; else "
                               "<output_dir>/eval")
    evaluate.add_argument("--overwrite", action="store_true", help="replace a finished evaluation in the output directory")
    evaluate.add_argument("--skip-finished", action="store_true",
                          help="do nothing if the output directory holds a finished evaluation (for requeued jobs)")
    evaluate.set_defaults(run=run_evaluate)

    export = sub.add_parser("export", help="write a checkpoint as a model transformers (or peft) loads without dsum")
    export.add_argument("source", type=Path, metavar="RUN_OR_CHECKPOINT",
                        help="a run (its final/), final/, or checkpoints/step-N")
    export.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the model goes (made if missing)")
    export.add_argument("--merge", action="store_true",
                        help="fold a LoRA or QLoRA adapter into its base and write a full model (QLoRA: into the "
                             "dequantised 4-bit base)")
    export.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), help="of a full or merged model's weights (default: "
                                                                      "model.dtype, as it trained)")
    export.add_argument("--base", metavar="NAME_OR_DIR",
                        help="the base an adapter goes onto (default: the one it was trained on)")
    export.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    export.set_defaults(run=run_export)

    score = sub.add_parser("score", help="score existing predictions against references with dsum's ROUGE")
    score.add_argument("--predictions", required=True, type=Path, metavar="FILE", help=".jsonl, .csv or .txt")
    score.add_argument("--references", type=Path, metavar="FILE",
                       help=".jsonl, .csv or .txt; leave out when the references are columns of the predictions file")
    score.add_argument("--prediction-field", default="prediction", metavar="F", help="default: prediction")
    score.add_argument("--reference-field", action="append", metavar="F",
                       help="repeat for several references per row (default: references, summary, or summary1..N)")
    score.add_argument("--id-field", metavar="F", help="match the two files by this column (default: id, if both have it)")
    score.add_argument("--json", action="store_true", help="print the metrics object, and nothing else, as JSON")
    score.set_defaults(run=run_score)

    compare = sub.add_parser("compare", help="a report comparing runs or evaluations (HTML, Markdown, CSV, plots)")
    compare.add_argument("runs", nargs="+", type=Path, metavar="RUN_OR_EVAL_DIR",
                         help="run directories (with eval/) or evaluation directories; the first is the baseline")
    compare.add_argument("--out", type=Path, metavar="DIR",
                         help="where the report goes (default: compare/ in the first run's directory)")
    compare.add_argument("--samples", type=int, default=5, metavar="K", help="sample dialogues shown (default: 5)")
    compare.set_defaults(run=run_compare)

    submit = sub.add_parser("submit", help="render a SLURM batch script for a recipe and submit it with sbatch")
    add_recipe_arguments(submit)
    submit.add_argument("--nodes", type=int, required=True, metavar="N")
    submit.add_argument("--gpus-per-node", type=int, required=True, metavar="G", help="0 for a CPU job")
    submit.add_argument("--job", choices=("train", "eval"), default="train", help="default: train")
    submit.add_argument("--checkpoint", type=Path, metavar="DIR", help="for --job eval: the model to evaluate")
    submit.add_argument("--accelerate", metavar="NAME|PATH",
                        help="accelerate_configs/NAME.yaml (default: ddp on one node, multi_node_ddp on several)")
    submit.add_argument("--time", metavar="HH:MM:SS", help="time limit")
    submit.add_argument("--partition", metavar="P")
    submit.add_argument("--account", metavar="A")
    submit.add_argument("--procs-per-node", type=int, metavar="N",
                        help="processes per node (default: the GPUs per node; 1 for a CPU job)")
    submit.add_argument("--signal-seconds", type=int, default=300, metavar="S",
                        help="SIGUSR1 this long before the time limit: checkpoint, stop, requeue (default: 300)")
    submit.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node (default: 29500)")
    submit.add_argument("--env-file", type=Path, metavar="FILE",
                        help="sourced by the job first: module loads, virtual environment, NCCL_* variables")
    submit.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="another #SBATCH option, for example --sbatch=--qos=high (repeatable)")
    submit.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")
    submit.set_defaults(run=run_submit)

    demo = sub.add_parser("demo", help="train and evaluate a tiny model on the synthetic corpus, offline, on a CPU")
    demo.add_argument("--output-dir", default="runs/demo", help="where the demo run goes (default: runs/demo)")
    demo.set_defaults(run=run_demo)

    add_bench_parser(sub)
    return parser


def add_bench_parser(sub) -> None:
    from dsum.bench.options import RESULTS  # these two import no more than dsum.config: the bench runs later
    from dsum.bench.sizes import CPU_MODELS, CPU_SIZES, CUDA_MODELS, CUDA_SIZES, DSUM_OPTIONS

    def per_device(name: str) -> str:
        return f"cpu {getattr(CPU_SIZES, name)}, cuda {getattr(CUDA_SIZES, name)}"

    bench = sub.add_parser(
        "bench", help="time dsum's training and evaluation against the course notebook and the no_trainer example",
        description="Train and evaluate the same random-init models three ways (the course notebook's Trainer, "
                    "transformers' run_summarization_no_trainer, dsum) on DialogSum, and report real tokens/s, "
                    "padding efficiency and dialogues/s; with --goals, time dsum alone against BENCHMARKS.md's GPU goals. "
                    "See BENCHMARKS.md.")
    bench.add_argument("--goals", action="store_true",
                       help="time dsum alone on the workloads BENCHMARKS.md sets GPU goals for (one flan-t5-base "
                            "epoch and its evaluation, Llama-2-7B QLoRA and LoRA on rows of 1,024 tokens) instead of "
                            "comparing three ways")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help=f"cpu: small models ({', '.join(m.name for m in CPU_MODELS)}), under 10 minutes on 2 cores; "
                            f"cuda: {', '.join(m.name for m in CUDA_MODELS)}, bf16 (default: cpu)")
    bench.add_argument("--data", type=Path, metavar="DIR",
                       help="the DialogSum directory (train/validation/test .jsonl; default: $DSUM_DIALOGSUM_DIR)")
    bench.add_argument("--json", type=Path, metavar="FILE", help="also write the results, machine and command as JSON")
    bench.add_argument("--models", metavar="A,B",
                       help="comma-separated subset of the device's models, or with --goals of its workloads "
                            "(default: all)")
    bench.add_argument("--train-steps", type=int, metavar="N",
                       help=f"optimizer steps timed in each way, after the warm-up (default: {per_device('train_steps')})")
    bench.add_argument("--eval-dialogues", type=int, metavar="N",
                       help=f"the first N test dialogues, 3 flattened rows each (default: {per_device('eval_dialogues')})")
    bench.add_argument("--notebook-rows", type=int, metavar="N",
                       help="flattened rows the notebook way generates one at a time; its time is extrapolated to "
                            f"all rows (default: {per_device('notebook_rows')})")
    bench.add_argument("--workdir", type=Path, metavar="DIR",
                       help="keep the random-init bases, tokenizer and runs here (default: a temporary directory)")
    bench.add_argument("--dsum", action="append", default=[], metavar="KEY=VALUE",
                       help="a setting of dsum's own way instead of its default, to measure what it changes "
                            f"(repeatable); KEY one of {', '.join(DSUM_OPTIONS)}")
    bench.add_argument("--profile", type=Path, metavar="DIR",
                       help="run torch.profiler over a few timed steps of each way's first training round (with "
                            "--goals, of each workload) and write per run NAME.txt and NAME.json (top operators by "
                            "self CPU and device time, the share of the steps the GPU was busy, host syncs, copies "
                            "and launches, kernels a step, step time), and summary.json with every run, into DIR")
    bench.add_argument("--record", action="store_true",
                       help=f"write the JSON results to {RESULTS}/<UTC date>-<device>-<bench|goals>-<commit>.json "
                            "under the current directory (instead of --json), to keep them with the code that made "
                            "them")
    bench.add_argument("--recipes", type=Path, metavar="DIR",
                       help="the recipes directory the GPU models take their settings from (default: recipes/ of "
                            "the dsum checkout running)")
    bench.add_argument("--table", action="store_true",
                       help="run nothing: rewrite the results table in BENCHMARKS.md from benchmarks/results/*.json, "
                            "in the current directory (a dsum checkout)")
    bench.set_defaults(run=run_bench)


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, for example recipes/tiny/t5-lora.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="settings that replace the recipe's")


def run_train(args: argparse.Namespace) -> int:
    overrides, resume = list(args.overrides), args.resume
    if resume is not None and "=" in resume and not Path(resume).exists():
        overrides.insert(0, resume)  # `--resume key=value`: the flag was bare, the word an override
        resume = "latest"
    train_and_evaluate(load_recipe(args.recipe, overrides), resume=resume, overwrite=args.overwrite)
    return 0


def train_and_evaluate(recipe: Recipe, *, resume: str | None = None, overwrite: bool = False,
                       run_tags: dict | None = None) -> Path:
    """`dsum train`: train to `final/` (dsum.train), then evaluate it and finish the run (dsum.evaluate); a
    run that trained before and stopped in its evaluation goes straight to the evaluation. `--resume auto`,
    what a requeued job runs, continues, starts, evaluates or sees that the run is done. Returns `final/`."""
    import time

    from dsum import distributed, run_dir
    from dsum.console import closing_line
    from dsum.evaluate import evaluate_run
    from dsum.train import train

    output_dir = Path(recipe.output_dir)
    final = output_dir / run_dir.FINAL
    if resume == "auto":
        resume, overwrite = run_dir.auto_resume(output_dir)
    if resume == run_dir.FINISHED:
        if distributed.is_main():
            print(f"{output_dir} already holds a finished run; nothing to do", flush=True)
        return final
    began = time.perf_counter()
    if resume in ("latest", run_dir.EVALUATE) and run_dir.only_evaluation_left(output_dir):
        if distributed.is_main() and recipe.eval.after_training:
            print(f"{output_dir} holds a trained run whose evaluation did not finish; evaluating {final}", flush=True)
        evaluate_run(recipe, output_dir)
    else:
        train(recipe, resume=resume, overwrite=overwrite, run_tags=run_tags)
        if recipe.eval.after_training:
            evaluate_run(recipe, output_dir)
    if distributed.is_main():
        print(closing_line(output_dir, time.perf_counter() - began, evaluated=recipe.eval.after_training), flush=True)
    distributed.end()
    return final


def run_validate(args: argparse.Namespace) -> int:
    if args.num_processes is not None and args.num_processes < 1:
        raise RecipeError(f"--num-processes: must be at least 1, got {args.num_processes}")
    recipe = load_recipe(args.recipe, args.overrides)
    from dsum.preview import describe_recipe

    world_size = args.num_processes or int(os.environ.get("WORLD_SIZE", "1"))
    print(describe_recipe(recipe, world_size))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    from dsum.evaluate import run_eval

    run_eval(recipe, checkpoint=args.checkpoint, output_dir=args.output_dir, overwrite=args.overwrite,
             skip_finished=args.skip_finished, base=args.base)
    return 0


EXPORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def run_export(args: argparse.Namespace) -> int:
    from dsum.export import export

    export(args.source, args.out, merge=args.merge, dtype=EXPORT_DTYPES.get(args.dtype), base=args.base,
           overwrite=args.overwrite)
    return 0


def run_submit(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    from dsum.submit import SubmitOptions, submit

    options = SubmitOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, job=args.job, procs_per_node=args.procs_per_node,
        accelerate=args.accelerate, time=args.time, partition=args.partition, account=args.account,
        signal_seconds=args.signal_seconds, port=args.port, env_file=args.env_file, checkpoint=args.checkpoint,
        sbatch_options=args.sbatch)
    submit(recipe, options, dry_run=args.dry_run)
    return 0


def run_score(args: argparse.Namespace) -> int:
    import json

    from dsum.score_files import load_pairs
    from dsum.scoring import rouge, rouge_table

    predictions, references = load_pairs(args.predictions, args.references, args.prediction_field,
                                         args.reference_field, args.id_field)
    metrics = rouge(predictions, references)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(rouge_table(metrics, f"ROUGE F1 of {args.predictions} (n={metrics['n']}; mean over references, then dialogues)"))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from dsum.report import FILES, check_out, compare, default_out, locate_all

    if args.samples < 0:
        raise RecipeError(f"--samples: must be at least 0, got {args.samples}")
    locate_all(args.runs)  # a path that is not a run is refused before anything is scored
    out = args.out or default_out(args.runs)
    check_out(out)
    count = f"{len(args.runs)} runs" if len(args.runs) > 1 else "1 run"
    print(f"comparing {count}, the first as the baseline: {', '.join(map(str, args.runs))}", flush=True)
    result = compare(args.runs, out, samples=args.samples)
    print(result.differences, flush=True)
    for warning in result.warnings:
        print(f"dsum: warning: {warning}", file=sys.stderr, flush=True)
    print(f"report written to {out / 'report.html'} (also {', '.join(FILES)} and the plots)", flush=True)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    if args.table:
        return write_bench_table(args)
    from dsum.bench.options import BenchOptions

    models = tuple(name.strip() for name in args.models.split(",") if name.strip()) if args.models else None
    options = BenchOptions(device=args.device, data=args.data, json_path=args.json, models=models,
                           train_steps=args.train_steps, eval_dialogues=args.eval_dialogues,
                           notebook_rows=args.notebook_rows, workdir=args.workdir, goals=args.goals,
                           dsum=tuple(args.dsum), profile=args.profile, record=args.record, recipes=args.recipes)
    if options.goals:
        from dsum.bench.goals import run_goals

        run_goals(options)
    else:
        from dsum.bench.three_ways import run_bench as compare_ways

        compare_ways(options)
    return 0


def write_bench_table(args: argparse.Namespace) -> int:
    from dsum.bench.table import write_table

    flags = {"--goals": args.goals, "--data": args.data, "--json": args.json, "--models": args.models,
             "--train-steps": args.train_steps, "--eval-dialogues": args.eval_dialogues,
             "--notebook-rows": args.notebook_rows, "--workdir": args.workdir, "--dsum": args.dsum,
             "--profile": args.profile, "--record": args.record, "--recipes": args.recipes}
    given = [flag for flag, value in flags.items() if value]
    if given:
        raise RecipeError(f"--table: it runs nothing, so {', '.join(given)} would do nothing; give --table alone")
    changed = write_table()
    print(f"BENCHMARKS.md: the results table {'rewritten from' if changed else 'already matches'} "
          "benchmarks/results/*.json", flush=True)
    return 0


DEMO_RECIPE = "demo.yaml"


def run_demo(args: argparse.Namespace) -> int:
    with resources.as_file(resources.files("dsum") / DEMO_RECIPE) as path:
        recipe = load_recipe(path, [f"output_dir={args.output_dir}"])
    train_and_evaluate(recipe, overwrite=is_demo_run(Path(args.output_dir)), run_tags={"demo": True})
    return 0


def is_demo_run(output_dir: Path) -> bool:
    """A previous demo in the same place is replaced; any other run there is refused as usual."""
    import json

    from dsum.run_dir import RUN_FILE

    try:
        info = json.loads((output_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return info.get("recipe", {}).get("data", {}).get("source") == "synthetic" and info.get("demo") is True


def quiet_libraries() -> None:
    """Library chatter that says nothing to a dsum user stays out of the terminal. Set before any of them
    is imported (a command that needs no model never imports torch), and only where the user set nothing."""
    # Set either way, tokenizers says nothing when the process forks. True: the featurizer's batched calls
    # use every core. A forked child would deadlock if it tokenized; no child of dsum does (no DataLoader
    # workers; its subprocesses run other programs).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' own bars follow this one
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    for name in ("deepspeed", "DeepSpeed", "torch.distributed", "transformers.modeling_utils"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, unsaid in UNSAID:
        logging.getLogger(name).addFilter(unsaid)  # the same filter each time: added once


class Unsaid(logging.Filter):
    """Drops a logger's records that begin with `start`, and nothing else."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


# Warnings that say nothing to a dsum user, by the logger they arise in. Where the `kernels` package is
# installed, bitsandbytes (on a CPU with AVX512-BF16) asks it for an optional kernel from the Hub when it is
# imported, which peft does for any LoRA. Offline, kernels warns that it cannot check the kernel's publisher,
# and bitsandbytes that it goes without the kernel (without `kernels`, only the second): it runs without it.
UNSAID = [("kernels._internals.hf_hub", Unsaid("Skipping publisher trust check for 'kernels-community/")),
          ("bitsandbytes.backends.cpu.ops", Unsaid("Failed to load CPU gemm_4bit_forward from kernels-community"))]


if __name__ == "__main__":
    sys.exit(main())
