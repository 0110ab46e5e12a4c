"""The `dsum` command: parses arguments, then calls one function per sub-command.

    dsum train RECIPE [key.sub=value ...] [--resume [PATH|latest]] [--overwrite]
    dsum validate RECIPE [key.sub=value ...] [--num-processes N]
    dsum demo [--output-dir DIR]

Errors in what the user gave (recipe, overrides, data, output directory) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import resources
from pathlib import Path

from dsum.config import RecipeError, load_recipe

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options too (`--resume latest train.max_steps=8`).
    unknown = [word for word in extra if word.startswith("-") or "=" not in word or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        return args.run(args)
    except RecipeError as err:
        print(f"dsum: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsum", description="Fine-tune and evaluate dialogue summarization models.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe")
    add_recipe_arguments(train)
    train.add_argument("--resume", nargs="?", const="latest", metavar="PATH|latest",
                       help="continue from a checkpoint directory, or the newest complete one (default: latest)")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    train.set_defaults(run=run_train)

    validate = sub.add_parser("validate", help="check a recipe and show what training would do, without training")
    add_recipe_arguments(validate)
    validate.add_argument("--num-processes", type=int, default=None,
                          help="processes the run will launch with (default: this launch's, or 1)")
    validate.set_defaults(run=run_validate)

    demo = sub.add_parser("demo", help="train and evaluate a tiny model on the synthetic corpus, offline, on a CPU")
    demo.add_argument("--output-dir", default="runs/demo", help="where the demo run goes (default: runs/demo)")
    demo.set_defaults(run=run_demo)
    return parser


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, for example recipes/tiny/t5-lora.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="settings that replace the recipe's")


def run_train(args: argparse.Namespace) -> int:
    from dsum.train import train

    overrides, resume = list(args.overrides), args.resume
    if resume is not None and "=" in resume and not Path(resume).exists():
        overrides.insert(0, resume)  # `--resume key=value`: the flag was bare, the word an override
        resume = "latest"
    recipe = load_recipe(args.recipe, overrides)
    train(recipe, resume=resume, overwrite=args.overwrite)
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from dsum.preview import describe_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    world_size = args.num_processes or int(os.environ.get("WORLD_SIZE", "1"))
    print(describe_recipe(recipe, world_size))
    return 0


DEMO_RECIPE = "demo.yaml"


def run_demo(args: argparse.Namespace) -> int:
    from dsum.train import train

    with resources.as_file(resources.files("dsum") / DEMO_RECIPE) as path:
        recipe = load_recipe(path, [f"output_dir={args.output_dir}"])
    train(recipe, overwrite=is_demo_run(Path(args.output_dir)), run_tags={"demo": True})
    print(f"demo finished: {Path(args.output_dir) / 'eval' / 'metrics.json'}")
    return 0


def is_demo_run(output_dir: Path) -> bool:
    """A previous demo in the same place is replaced; any other run there is refused as usual."""
    import json

    try:
        info = json.loads((output_dir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("recipe", {}).get("data", {}).get("source") == "synthetic" and info.get("demo") is True


def quiet_libraries() -> None:
    """Library chatter that says nothing to a dsum user stays out of the terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("deepspeed", "DeepSpeed", "torch.distributed", "transformers.modeling_utils"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
