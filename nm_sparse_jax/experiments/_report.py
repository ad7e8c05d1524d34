"""Tables, plots and figure data of a comparison (from the run records of ``compare``)."""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._runner import compact

__all__ = [
  "RECIPE_TITLES",
  "accuracy_table",
  "figures",
  "flops_table",
  "paired_table",
  "write_reports",
]

RECIPE_TITLES = {
  "dense": "Dense",
  "ste": "STE",
  "sr_ste": "SR-STE",
  "mdgf_linear": "MDGF-Linear",
  "mdgf_exponential": "MDGF-Exponential",
  "sdgf_stepwise": "SDGF-Stepwise",
  "sdgf_geometric": "SDGF-Geometric",
}
# Diagnostics plotted for each group: key, axis title, log y axis, smoothed.
PANELS = (
  ("nu_var", "Var(Adam nu) (Fig. 3a)", True, True),
  ("grad_abs_var", "Var(|grad|) (Fig. 3b)", True, True),
  ("target_flip_rate", "target-mask flip rate", True, True),
  ("flip_rate", "flip rate of the mask in use (raw)", True, False),
  ("density", "n/m of the mask in use", False, False),
  ("decay", "D(j)", False, False),
  ("sparsity", "realised sparsity of W~", False, False),
  ("loss", "training loss", True, True),
)
# Exponential moving average of the noisy diagnostics (the paper plots running averages).
EMA = 0.9


def _labels(runs) -> list[str]:
  return list(dict.fromkeys(r["label"] for r in runs if r["recipe"] != "dense"))


def _recipes(runs) -> list[str]:
  return list(dict.fromkeys(r["recipe"] for r in runs))


def _cell(runs, recipe, label) -> list[dict]:
  return [r for r in runs if r["recipe"] == recipe and (recipe == "dense" or r["label"] == label)]


def _stats(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for one value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def accuracy_table(runs: Sequence[Mapping[str, Any]]) -> str:
  """Markdown: final accuracy (%) mean +- std over seeds, rows = targets, columns = recipes.

  The best mean of each row is bold; ``n`` is the number of seeds.
  """
  recipes = _recipes(runs)
  rows = ["| Sparse target | " + " | ".join(RECIPE_TITLES.get(r, r) for r in recipes) + " |"]
  rows.append("|---|" + "---:|" * len(recipes))
  for label in _labels(runs):
    cells = {}
    for recipe in recipes:
      cell = _cell(runs, recipe, label)
      if cell:
        cells[recipe] = (*_stats([100 * r["final_accuracy"] for r in cell]), len(cell))
    best = max((v[0] for k, v in cells.items() if k != "dense"), default=None)
    texts = []
    for recipe in recipes:
      if recipe not in cells:
        texts.append("-")
        continue
      mean, std, n = cells[recipe]
      text = f"{mean:.2f} ± {std:.2f} (n={n})"
      texts.append(f"**{text}**" if recipe != "dense" and mean == best else text)
    rows.append(f"| {label} | " + " | ".join(texts) + " |")
  return "\n".join(rows)


def paired_table(runs: Sequence[Mapping[str, Any]], baseline: str = "sr_ste") -> str:
  """Markdown: accuracy difference to ``baseline`` (points), paired by seed: mean +- std.

  Runs with the same seed share the initialisation and the order of the training examples,
  so the per-seed difference removes much of the seed-to-seed noise. ``> spread`` marks a
  mean difference larger than twice its standard error (``2 * std / sqrt(n)``), and larger
  than the baseline's own seed std.
  """
  recipes = [r for r in _recipes(runs) if r not in ("dense", baseline)]
  if not recipes or not any(r["recipe"] == baseline for r in runs):
    return f"(no runs to compare with {RECIPE_TITLES.get(baseline, baseline)})"
  rows = [
    "| Sparse target | "
    + " | ".join(
      f"{RECIPE_TITLES.get(r, r)} − {RECIPE_TITLES.get(baseline, baseline)}" for r in recipes
    )
    + " |"
  ]
  rows.append("|---|" + "---:|" * len(recipes))
  for label in _labels(runs):
    base = {r["seed"]: r["final_accuracy"] for r in _cell(runs, baseline, label)}
    if not base:
      continue
    base_std = _stats([100 * v for v in base.values()])[1]
    texts = []
    for recipe in recipes:
      diffs = [
        100 * (r["final_accuracy"] - base[r["seed"]])
        for r in _cell(runs, recipe, label)
        if r["seed"] in base
      ]
      if not diffs:
        texts.append("-")
        continue
      mean, std = _stats(diffs)
      error = 2 * std / np.sqrt(len(diffs)) if len(diffs) > 1 else float("inf")
      mark = " (> spread)" if abs(mean) > max(error, base_std) else ""
      texts.append(f"{mean:+.2f} ± {std:.2f}{mark}")
    rows.append(f"| {label} | " + " | ".join(texts) + " |")
  return "\n".join(rows)


def flops_table(runs: Sequence[Mapping[str, Any]]) -> str:
  """Markdown: training FLOPs per phase and inference FLOPs per (target, recipe).

  Training FLOPs are totals of the run (all steps, all examples), as defined in
  :mod:`nm_sparse_jax.training_flops`; inference FLOPs are per example.
  """
  rows = [
    "| Sparse target | Recipe | dense phase | decaying phase | fine-tune phase | training total "
    "| vs dense training | inference per example | vs dense inference |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  seen = set()
  for label in _labels(runs):
    for recipe in _recipes(runs):
      cell = _cell(runs, recipe, label)
      key = (recipe, "" if recipe == "dense" else label)
      if not cell or key in seen:
        continue
      seen.add(key)
      r = cell[0]
      f, inf = r["training_flops"], r["inference_flops"]
      rows.append(
        f"| {'all' if recipe == 'dense' else label} | {RECIPE_TITLES.get(recipe, recipe)} | "
        f"{f['dense']:.3g} | {f['decaying']:.3g} | {f['fine_tune']:.3g} | {f['total']:.3g} | "
        f"{f['total'] / r['dense_training_flops']:.3f} | {inf['sparse']:.3g} | "
        f"{inf['sparse'] / inf['dense']:.3f} |"
      )
  return "\n".join(rows)


def _ema(values: np.ndarray, alpha: float = EMA) -> np.ndarray:
  out = np.empty_like(values)
  acc = values[0]
  for i, v in enumerate(values):
    acc = alpha * acc + (1 - alpha) * v
    out[i] = acc
  return out


def _curve(run, group: str, key: str) -> np.ndarray | None:
  curves = run["curves"]
  if key == "loss":
    return np.asarray(curves["loss"], np.float64)
  if key == "density":
    if f"{group}/n" not in curves:
      return None
    return np.asarray(curves[f"{group}/n"], np.float64) / np.asarray(curves[f"{group}/m"])
  values = curves.get(f"{group}/{key}")
  return None if values is None else np.asarray(values, np.float64)


def _series(cell, group: str, key: str, smooth: bool) -> dict[str, list] | None:
  values = [_curve(r, group, key) for r in cell]
  values = [v for v in values if v is not None]
  if not values:
    return None
  length = min(len(v) for v in values)
  values = np.array([_ema(v[:length]) if smooth else v[:length] for v in values])
  return {
    "step": list(cell[0]["curves"]["step"][:length]),
    "mean": values.mean(0).tolist(),
    "min": values.min(0).tolist(),
    "max": values.max(0).tolist(),
  }


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def figures(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """The data of every plot: PNG name -> title, axes and series (mean, min, max over seeds).

  * ``diagnostics_<target>_<group>.png`` (Fig. 3): the diagnostics of one layer group against
    the step, one line per recipe (mean over seeds of the logged values, the noisy ones
    smoothed by an EMA of 0.9 as the paper's running averages; band: min to max over seeds);
  * ``accuracy_vs_training_flops_<target>.png`` (Fig. 4b): test accuracy (intermediate ones with
    ``W~`` on a test subset, the last one finalized on the whole test set) against training
    FLOPs spent so far;
  * ``accuracy_vs_inference_flops.png`` (Fig. 5): final accuracy against inference FLOPs.
  """
  out: dict[str, dict[str, Any]] = {}
  recipes = _recipes(runs)
  for label in _labels(runs):
    target = next(r["target"] for r in runs if r["label"] == label)
    for group in target:
      panels = {}
      for key, title, log, smooth in PANELS:
        lines = {}
        for recipe in recipes:
          cell = _cell(runs, recipe, label)
          series = _series(cell, group, key, smooth) if cell else None
          if series is not None:
            lines[RECIPE_TITLES.get(recipe, recipe)] = series
        if lines:
          panels[key] = {"title": title, "log": log, "ema": EMA if smooth else None, "lines": lines}
      out[f"diagnostics_{_slug(label)}_{group}.png"] = {
        "title": (
          f"{label}: {group.upper()} diagnostics (noisy curves: EMA {EMA}; band: min-max "
          "over seeds)"
        ),
        "xlabel": "step",
        "panels": panels,
      }
    lines = {}
    for recipe in recipes:
      cell = _cell(runs, recipe, label)
      if not cell:
        continue
      evals = np.array([r["eval"] for r in cell], np.float64)  # (seeds, points, 3)
      lines[RECIPE_TITLES.get(recipe, recipe)] = {
        "training_flops": evals[0, :, 1].tolist(),
        "step": evals[0, :, 0].astype(int).tolist(),
        "mean": evals[:, :, 2].mean(0).tolist(),
        "min": evals[:, :, 2].min(0).tolist(),
        "max": evals[:, :, 2].max(0).tolist(),
      }
    out[f"accuracy_vs_training_flops_{_slug(label)}.png"] = {
      "title": f"{label}: accuracy vs training FLOPs",
      "xlabel": "training FLOPs so far",
      "ylabel": "test accuracy",
      "lines": lines,
    }
  points = {}
  for recipe in recipes:
    for label in _labels(runs):
      cell = _cell(runs, recipe, label)
      if not cell or (recipe == "dense" and "Dense" in points):
        continue
      mean, std = _stats([r["final_accuracy"] for r in cell])
      name = "Dense" if recipe == "dense" else f"{RECIPE_TITLES.get(recipe, recipe)} {label}"
      points[name] = {
        "recipe": recipe,
        "label": label,
        "inference_flops": cell[0]["inference_flops"]["sparse"],
        "training_flops": cell[0]["training_flops"]["total"],
        "mean": mean,
        "std": std,
      }
  out["accuracy_vs_inference_flops.png"] = {
    "title": "final accuracy vs inference FLOPs per example",
    "xlabel": "inference FLOPs per example",
    "ylabel": "test accuracy",
    "points": points,
  }
  return out


def _pyplot():
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError as e:
    raise ImportError(
      "the comparison's plots need matplotlib: pip install matplotlib (or pass --no-plots / "
      "plots=False; results.json, results.md and figures.json are written without it)"
    ) from e
  return plt


def _plot(name: str, figure: Mapping[str, Any], path: pathlib.Path) -> None:
  plt = _pyplot()
  colors = {t: f"C{i}" for i, t in enumerate(RECIPE_TITLES.values())}
  if "panels" in figure:
    panels = figure["panels"]
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (key, panel) in zip(axes.flat, panels.items()):
      for title, s in panel["lines"].items():
        ax.plot(s["step"], s["mean"], color=colors.get(title), label=title, lw=1.2)
        ax.fill_between(s["step"], s["min"], s["max"], color=colors.get(title), alpha=0.2, lw=0)
      if panel["log"]:
        ax.set_yscale(
          "symlog" if "flip" in key else "log", **({"linthresh": 1e-6} if "flip" in key else {})
        )
      ax.set_title(panel["title"], fontsize=9)
      ax.tick_params(labelsize=7)
      ax.set_xlabel(figure["xlabel"], fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
      ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(figure["title"], fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
  elif "lines" in figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    for title, s in figure["lines"].items():
      ax.plot(s["training_flops"], s["mean"], "o-", color=colors.get(title), label=title, ms=3)
      ax.fill_between(s["training_flops"], s["min"], s["max"], color=colors.get(title), alpha=0.2)
    ax.set_xlabel(figure["xlabel"])
    ax.set_ylabel(figure["ylabel"])
    ax.set_title(figure["title"], fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
  else:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {}
    for p in figure["points"].values():
      color = colors.get(RECIPE_TITLES.get(p["recipe"], p["recipe"]))
      marker = markers.setdefault(p["label"], "osD^v<>p*h"[len(markers) % 10])
      ax.errorbar(
        p["inference_flops"], p["mean"], yerr=p["std"], fmt=marker, color=color, ms=5, capsize=2
      )
    for recipe, title in RECIPE_TITLES.items():
      if any(p["recipe"] == recipe for p in figure["points"].values()):
        ax.plot([], [], "-", lw=4, color=colors[title], label=title)
    for label, marker in markers.items():
      ax.plot([], [], marker, color="grey", label=label)
    ax.set_xlabel(figure["xlabel"])
    ax.set_ylabel(figure["ylabel"])
    ax.set_title(figure["title"], fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
  fig.savefig(path / name, dpi=80)
  plt.close(fig)


def write_reports(
  runs: Sequence[Mapping[str, Any]],
  out_dir: str | pathlib.Path,
  *,
  meta: Mapping[str, Any] | None = None,
  plots: bool = True,
) -> dict[str, pathlib.Path]:
  """Writes ``results.md`` (accuracy, paired-difference and FLOPs tables), ``figures.json``
  and, with ``plots``, one PNG per figure into ``out_dir``. Returns the written paths.

  Raises:
    ImportError: ``plots`` without matplotlib (the tables and JSON are written first).
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  meta = dict(meta or {})
  text = [
    f"# {meta.get('description', 'comparison')}",
    "",
    "Final test accuracy (%), mean ± sample std over seeds:",
    "",
    accuracy_table(runs),
    "",
    "Accuracy difference to SR-STE (points), paired by seed:",
    "",
    paired_table(runs),
    "",
    "Training FLOPs (see nm_sparse_jax.training_flops) and inference FLOPs:",
    "",
    flops_table(runs),
    "",
  ]
  written = {"results.md": out / "results.md", "figures.json": out / "figures.json"}
  (out / "results.md").write_text("\n".join(text))
  data = figures(runs)
  (out / "figures.json").write_text(json.dumps(compact(data, 4), separators=(",", ":")))
  if plots:
    for name, figure in data.items():
      _plot(name, figure, out)
      written[name] = out / name
  return written
