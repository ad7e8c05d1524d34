"""Command line: ``python -m nm_sparse_jax {demo,bench,compare} ...`` (also ``nm-sparse-jax``)."""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> None:
  from nm_sparse_jax.demo import DemoConfig, run_demo
  from nm_sparse_jax.models.vit import ViTConfig

  config = DemoConfig(
    recipe=args.recipe,
    ff=None if args.ff == "none" else args.ff,
    attention=None if args.attention == "none" else args.attention,
    steps=args.steps,
    batch=args.batch,
    seed=args.seed,
    model=ViTConfig(
      hidden=args.hidden, depth=args.depth, heads=args.heads, mlp_dim=4 * args.hidden
    ),
  )
  run_demo(config, baseline=not args.no_baseline, progress=not args.no_progress)


def _bench(args: argparse.Namespace) -> None:
  if args.what == "masks":
    from nm_sparse_jax.bench.masks import main as bench_main
  elif args.what == "spmm":
    from nm_sparse_jax.bench.spmm import main as bench_main
  else:
    from nm_sparse_jax.bench.step import main as bench_main
  bench_main(args.rest)


def _compare(args: argparse.Namespace) -> None:
  from nm_sparse_jax.experiments import Settings, compare, make_task

  model = {
    k: v
    for k, v in dict(
      hidden=args.hidden, depth=args.depth, heads=args.heads, mlp_dim=args.mlp_dim
    ).items()
    if v is not None
  }
  if args.task == "fashion_mnist":
    task_args = dict(data_dir=args.data_dir, patch_size=args.patch_size, **model)
  elif args.task == "bible":
    task_args = dict(
      db_path=args.data_dir, vocab_size=args.vocab_size, max_len=args.max_len, **model
    )
  else:
    task_args = dict(model)
  if args.task != "digits":
    task_args.update(train_subset=args.train_subset, test_subset=args.test_subset)
  task = make_task(args.task, **task_args)
  settings = Settings(
    steps=args.steps,
    batch=args.batch,
    learning_rate=args.lr,
    dense_fraction=args.dense_fraction,
    fine_tune_fraction=args.fine_tune_fraction,
    gradient=args.gradient,
    log_every=args.log_every,
    eval_every=args.eval_every,
    eval_examples=args.eval_examples,
  )
  print(f"{task.description}; {settings}")
  compare(
    task,
    recipe_names=[r for r in args.recipes.split(",") if r],
    targets=args.targets,
    seeds=[int(s) for s in args.seeds.split(",") if s],
    settings=settings,
    out_dir=args.out,
    resume=args.resume,
    progress=not args.no_progress,
    plots=not args.no_plots,
    meta={"command": " ".join(["python -m nm_sparse_jax", *args.argv])},
  )
  print((pathlib.Path(args.out) / "results.md").read_text())


def main(argv: Sequence[str] | None = None) -> None:
  from nm_sparse_jax.recipes import RECIPE_NAMES

  parser = argparse.ArgumentParser(prog="nm_sparse_jax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  demo = sub.add_parser("demo", help="train a small ViT on scikit-learn's digits, dense vs N:M")
  demo.add_argument("--recipe", default="mdgf_exponential", choices=RECIPE_NAMES)
  demo.add_argument("--ff", default="1:8", help="N:M of the feed-forward kernels, or 'none'")
  demo.add_argument("--attention", default="none", help="N:M of query/key/value, or 'none'")
  demo.add_argument("--steps", type=int, default=1200)
  demo.add_argument("--batch", type=int, default=64)
  demo.add_argument("--hidden", type=int, default=64)
  demo.add_argument("--depth", type=int, default=3)
  demo.add_argument("--heads", type=int, default=4)
  demo.add_argument("--seed", type=int, default=0)
  demo.add_argument("--no-baseline", action="store_true", help="skip the dense baseline run")
  demo.add_argument("--no-progress", action="store_true", help="no progress bar")
  demo.set_defaults(func=_demo)
  bench = sub.add_parser(
    "bench",
    help="benchmarks: 'masks' (nm_mask vs x*y), 'step' (overhead), 'spmm' (sparse inference)",
  )
  bench.add_argument("what", choices=("masks", "step", "spmm"))
  bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
  bench.set_defaults(func=_bench)
  cmp = sub.add_parser(
    "compare", help="train recipes x N:M targets x seeds on one task; tables, plots, JSON"
  )
  cmp.add_argument("--task", default="fashion_mnist", choices=("fashion_mnist", "bible", "digits"))
  cmp.add_argument(
    "--recipes",
    default="dense,sr_ste,mdgf_linear,mdgf_exponential,sdgf_stepwise,sdgf_geometric",
    help=f"comma-separated, of: {', '.join(RECIPE_NAMES)}",
  )
  cmp.add_argument(
    "--targets",
    nargs="+",
    default=["ff=1:8"],
    help="N:M targets, each GROUP=N:M[,GROUP=N:M] (groups: ff, q, k, v, o, qk, qkv)",
  )
  cmp.add_argument("--seeds", default="0,1", help="comma-separated seeds")
  cmp.add_argument("--steps", type=int, default=1000)
  cmp.add_argument("--batch", type=int, default=64)
  cmp.add_argument("--lr", type=float, default=1e-3)
  cmp.add_argument("--dense-fraction", type=float, default=0.1)
  cmp.add_argument("--fine-tune-fraction", type=float, default=0.2)
  cmp.add_argument(
    "--gradient",
    default="autodiff",
    choices=("autodiff", "straight_through"),
    help="MDGF/SDGF gradient of pruned weights: D(j)*g (autodiff) or g (straight_through)",
  )
  cmp.add_argument("--log-every", type=int, default=10)
  cmp.add_argument("--eval-every", type=int, default=250)
  cmp.add_argument("--eval-examples", type=int, default=2000)
  cmp.add_argument("--data-dir", help="IDX directory (fashion_mnist) or bible.db (bible)")
  cmp.add_argument("--train-subset", type=int, help="train on a fixed subset of this size")
  cmp.add_argument("--test-subset", type=int, help="test on a fixed subset of this size")
  cmp.add_argument("--patch-size", type=int, default=4, help="fashion_mnist ViT patch size")
  cmp.add_argument("--vocab-size", type=int, default=2000, help="bible sentencepiece vocabulary")
  cmp.add_argument("--max-len", type=int, default=48, help="bible tokens per sequence")
  cmp.add_argument("--hidden", type=int, help="model width (default: the task's)")
  cmp.add_argument("--depth", type=int, help="layers (bible: encoder and decoder each)")
  cmp.add_argument("--heads", type=int)
  cmp.add_argument("--mlp-dim", type=int)
  cmp.add_argument("--out", default="compare_results", help="output directory")
  cmp.add_argument("--resume", action="store_true", help="skip runs already in OUT/results.json")
  cmp.add_argument("--no-plots", action="store_true", help="write no PNG (needs no matplotlib)")
  cmp.add_argument("--no-progress", action="store_true", help="no progress bar")
  cmp.set_defaults(func=_compare)
  args = parser.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  args.func(args)


if __name__ == "__main__":
  sys.exit(main())
