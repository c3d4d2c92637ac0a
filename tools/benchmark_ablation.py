"""Ablation of the real-data recipe: one training per row and seed, the same wall-time budget.

    python -m tools.benchmark_ablation --labels CSV --images DIR --output DIR [--minutes 10]
        [--seeds 0,1] [--rows recipe,head_regression,...] [--flagfile configs/rsna_cpu.flags]
        [--data DIR] [--json PATH]

Each row is the flagfile plus the row's overrides (`ROWS`), trained by `boneage_tpu.train`
with `--max_train_minutes M --seed S`, then evaluated by `boneage_tpu.evaluate` on the
converter's val split: plain, with rotflip TTA, bias-corrected (the recipe fits the
correction after training), and plainly on the four export-window shifts of
`tools.benchmark_real` (the worst ratio to the plain MAE is reported). The TTA and bias
correction rows of the table are the `recipe` row's own evaluations: neither changes training.
Rows that train at another size get their own conversion at the recipe's stored-to-trained
ratio (160 px stored for 128 trained), so only the resolution differs. The `kfold3` row
converts the train split into 3 stratified folds, trains `--fold 0,1,2` for M/3 minutes each
(the same total budget) and evaluates the 3-member ensemble on the same val split.

Rows run one at a time (a 2-core machine gives each all of it); a row and seed whose model
directory holds DONE is evaluated again without retraining, so an interrupted ablation
resumes. Prints a Markdown table and writes (--json, default OUTPUT/ablation.json) one JSON
object with every row, seed, command and figure.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from boneage_tpu.cli import option
from boneage_tpu.core.errors import UsageError
from tools import benchmark_real as real

# name -> (what the row changes, the overrides after the flagfile).
ROWS: dict[str, tuple[str, list[str]]] = {
    "recipe": ("the recipe as it is (bins head, z-score input, sex, augmentation, 128 px)", []),
    "head_regression": (
        "regression head (one z-score) instead of 64 age bins",
        ["--head=regression"],
    ),
    "input_norm_none": ("no per-image z-score of the input", ["--input_norm=none"]),
    "no_sex": ("no sex input", ["--nouse_sex"]),
    "no_augment": ("no augmentation (geometry and intensity)", ["--noaugment"]),
    "balance_age_sex": ("sampling balanced over age band x sex", ["--balance=age_sex"]),
    "size_160": ("160 px trained (200 px stored)", ["--image_size=160"]),
    "size_192": ("192 px trained (240 px stored)", ["--image_size=192"]),
    "precision_fp32": (
        "fp32 instead of the recipe's mixed bfloat16 on CPUs with AVX-512 BF16 or AMX",
        ["--precision=fp32"],
    ),
    "kfold3": ("3-fold ensemble of the train split, M/3 minutes per fold", []),
}
NUM_FOLDS = 3


@dataclasses.dataclass
class AblationConfig:
    """The ablation's settings (--flagfile is taken out of the command line first)."""

    labels: str = option("", "Labels CSV of the training data.", required=True)
    images: str = option("", "Folder of its images (searched recursively).", required=True)
    output: str = option("", "Work folder: data, models, evaluations, logs.", required=True)
    minutes: float = option(10.0, "Training wall-time budget per row and seed.", min=0.01)
    seeds: str = option("0", "Comma-separated training seeds.")
    rows: str = option(",".join(ROWS), f"Comma-separated rows of: {', '.join(ROWS)}.")
    data: str = option("", "Converted data at the recipe's stored size (default OUTPUT/data).")
    json: str = option("", "JSON output (default OUTPUT/ablation.json).")
    flagfile: str = real.DEFAULT_FLAGFILE


def parse_list(text: str, name: str) -> list[str]:
    """Splits a comma-separated flag value; UsageError when it is empty."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"--{name} is empty")
    return items


def parse_seeds(text: str) -> list[int]:
    """The --seeds list as integers >= 0; UsageError for anything else."""
    items = parse_list(text, "seeds")
    if not all(item.isdigit() for item in items):
        raise UsageError(f"--seeds must be comma-separated integers >= 0, got {text!r}")
    return [int(item) for item in items]


def check_rows(names: Sequence[str]) -> list[str]:
    """Returns the row names in order; UsageError naming any unknown one."""
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise UsageError(f"unknown --rows {','.join(unknown)}: known are {','.join(ROWS)}")
    return list(names)


def row_image_size(overrides: Sequence[str], recipe_size: int) -> int:
    """The trained size of a row: its --image_size override, else the recipe's."""
    for arg in overrides:
        if arg.startswith("--image_size="):
            return int(arg.split("=", 1)[1])
    return recipe_size


def stored_size(trained: int, recipe_trained: int, recipe_stored: int) -> int:
    """The stored size that keeps the recipe's stored-to-trained ratio (160/128 -> 192: 240)."""
    return round(trained * recipe_stored / recipe_trained)


def summarise(runs: Sequence[dict[str, Any]], key: str) -> dict[str, float | None]:
    """Mean and spread (max - min) of one figure over a row's seeds."""
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return {"mean": None, "spread": None}
    return {"mean": statistics.fmean(values), "spread": max(values) - min(values)}


def markdown_table(result: dict[str, Any]) -> str:
    """The table of BENCHMARKS.md: one line per row (and the recipe's TTA and correction)."""

    def cell(stats: dict[str, float | None], seeds: int) -> str:
        if stats["mean"] is None:
            return "-"
        return f"{stats['mean']:.2f}" + (f" ± {stats['spread'] / 2:.2f}" if seeds > 1 else "")

    lines = [
        "| row | change | val MAE | Δ vs recipe | worst shift ratio | steps | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    base = result["rows"].get("recipe", {}).get("val_mae_months", {}).get("mean")
    for name, row in result["rows"].items():
        seeds = len(row["runs"])
        mae = row["val_mae_months"]
        delta = f"{mae['mean'] - base:+.2f}" if base is not None and mae["mean"] else "-"
        ratio = row["worst_shift_ratio"]
        steps = "-" if row["steps"]["mean"] is None else f"{row['steps']['mean']:.0f}"
        lines.append(
            f"| {name} | {row['change']} | {cell(mae, seeds)} | {delta} | "
            f"{cell(ratio, seeds) if ratio['mean'] else '-'} | "
            f"{steps} | {seeds} |"
        )
        if name == "recipe" and base is not None:
            for label, key in (
                ("recipe + rotflip TTA", "val_mae_tta_months"),
                ("recipe + bias correction", "val_mae_corrected_months"),
                ("recipe + TTA + bias correction", "val_mae_tta_corrected_months"),
            ):
                stats = row[key]
                if stats["mean"] is not None:
                    lines.append(
                        f"| {label} | the recipe row's models, evaluated so | "
                        f"{cell(stats, seeds)} | {stats['mean'] - base:+.2f} | - | - | {seeds} |"
                    )
    return "\n".join(lines)


class _Runner:
    """Runs and evaluates rows, converting each stored size and shift set once."""

    def __init__(self, config: AblationConfig) -> None:
        self.config = config
        self.out = pathlib.Path(config.output).resolve()
        self.logs = self.out / "logs"
        self.commands: list[str] = []
        # The size the trainer reads from the recipe (its default when the file has none).
        self.recipe_size = int(real.recipe_flags(config.flagfile)["image_size"].value)
        self.base_data = pathlib.Path(config.data).resolve() if config.data else self.out / "data"
        if not real.has_manifest(self.base_data):
            real.convert(
                config.labels,
                config.images,
                self.base_data,
                round(self.recipe_size * 1.25),
                self.logs,
                self.commands,
            )
        self.base_stored = int(real.read_manifest(self.base_data)["image_size"])
        self.val_rows = real.split_records(self.base_data, "val")
        self.paths = real.image_paths(config.images, [r[0] for r in self.val_rows])

    def data_for(self, size: int) -> pathlib.Path:
        """Converted train/val data stored at `size` (the base data at its own size)."""
        if size == self.base_stored:
            return self.base_data
        folder = self.out / f"data-{size}"
        real.convert(
            self.config.labels,
            self.config.images,
            folder,
            size,
            self.logs,
            self.commands,
            log_name=f"data-{size}",
        )
        return folder

    def shifted(self, name: str, size: int) -> pathlib.Path:
        """The val split under one export-window shift, stored at `size`."""
        folder = self.out / "robustness" / name
        labels, images = real.write_transformed(self.val_rows, self.paths, folder, name)
        data = folder / f"data-{size}"
        real.convert(
            str(labels),
            str(images),
            data,
            size,
            self.logs,
            self.commands,
            "val",
            f"{name}-{size}",
        )
        return data

    def folds(self) -> pathlib.Path:
        """The train split's rows in NUM_FOLDS stratified folds, at the base stored size."""
        folder = self.out / f"folds{NUM_FOLDS}"
        if real.has_manifest(folder):
            return folder
        labels = self.out / f"folds{NUM_FOLDS}-labels.csv"
        real.write_labels_csv(labels, real.split_records(self.base_data, "train"))
        # The CSV names each image by id; the converter finds them under --images.
        args = [
            "-m",
            "boneage_tpu.convert",
            "--labels",
            str(labels),
            "--images",
            self.config.images,
        ]
        args += ["--output", str(folder), "--image_size", str(self.base_stored)]
        args += ["--num_folds", str(NUM_FOLDS), "--quiet"]
        real.run_command(args, self.logs / f"convert-folds{NUM_FOLDS}.log", self.commands)
        return folder

    def train(self, model_dir: pathlib.Path, args: list[str], minutes: float) -> dict[str, Any]:
        """Trains unless model_dir holds DONE; returns the step and throughput figures."""
        log = self.logs / f"train-{model_dir.parent.name}-{model_dir.name}.log"
        if real.read_done(model_dir) is not None:
            # The trainer's own records are in the model directory: its figures stand.
            print(f"reusing the finished model in {model_dir}", flush=True)
            info = real.read_training(model_dir)
        elif model_dir.exists() and any(model_dir.iterdir()):
            raise real.BenchError(f"{model_dir} holds an unfinished run: remove it to retrain")
        else:
            args = ["-m", "boneage_tpu.train", "--flagfile", self.config.flagfile, *args]
            args += ["--max_train_minutes", f"{minutes:g}", "--model_dir", str(model_dir)]
            real.run_command(args, log, self.commands)
            info = real.read_training(model_dir)
        return {"steps": info["final_step"], "train_img_s": info["images_per_second"]}

    def run(self, name: str, seed: int) -> dict[str, Any]:
        """Trains and evaluates one row for one seed; returns its figures."""
        _, overrides = ROWS[name]
        folder = self.out / name
        trained = row_image_size(overrides, self.recipe_size)
        size = stored_size(trained, self.recipe_size, self.base_stored)
        common = [*overrides, "--seed", str(seed)]
        if name == "kfold3":
            data = self.folds()
            model_dirs, steps = [], []
            for fold in range(NUM_FOLDS):
                model_dir = folder / f"seed{seed}-fold{fold}"
                info = self.train(
                    model_dir,
                    [*common, "--data", str(data), "--fold", str(fold)],
                    self.config.minutes / NUM_FOLDS,
                )
                model_dirs.append(model_dir)
                steps.append(info["steps"])
            info = {"steps": sum(steps), "train_img_s": None, "fold_steps": steps}
            val_data = self.base_data
        else:
            val_data = self.data_for(size)
            model_dir = folder / f"seed{seed}"
            model_dirs = [model_dir]
            info = self.train(model_dir, [*common, "--data", str(val_data)], self.config.minutes)
        evals = folder / f"eval-seed{seed}"
        plain = real.evaluate(model_dirs, val_data, "val", "none", evals / "val", self.commands)
        figures: dict[str, Any] = {"seed": seed, **info}
        figures["val_mae_months"] = real.plain_mae(plain)
        figures["val_mae_corrected_months"] = plain.get("mae_corrected_months")
        if name == "recipe":
            tta = real.evaluate(
                model_dirs, val_data, "val", real.TTA, evals / f"val-{real.TTA}", self.commands
            )
            figures["val_mae_tta_months"] = real.plain_mae(tta)
            figures["val_mae_tta_corrected_months"] = tta.get("mae_corrected_months")
        shifts = {}
        for shift in real.TRANSFORMS:
            values = real.evaluate(
                model_dirs, self.shifted(shift, size), "val", "none", evals / shift, self.commands
            )
            shifts[shift] = real._ratio(real.plain_mae(values), figures["val_mae_months"])
        figures["shift_ratios"] = shifts
        figures["worst_shift_ratio"] = max((v for v in shifts.values() if v), default=None)
        return figures


def run(config: AblationConfig) -> dict[str, Any]:
    """Runs every row and seed; returns the JSON object (rows in the order given)."""
    names = check_rows(parse_list(config.rows, "rows"))
    seeds = parse_seeds(config.seeds)
    runner = _Runner(config)
    result: dict[str, Any] = {
        "flagfile": config.flagfile,
        "minutes_per_row": config.minutes,
        "seeds": seeds,
        "row_order": names,  # "rows" is written with sorted keys
        "rows": {},
        "commands": runner.commands,
    }
    for name in names:
        runs = [runner.run(name, seed) for seed in seeds]
        row: dict[str, Any] = {"change": ROWS[name][0], "overrides": ROWS[name][1], "runs": runs}
        for key in (
            "val_mae_months",
            "val_mae_corrected_months",
            "val_mae_tta_months",
            "val_mae_tta_corrected_months",
            "worst_shift_ratio",
            "steps",
        ):
            row[key] = summarise(runs, key)
        result["rows"][name] = row
        # Written after every row, so that a long ablation can be read while it runs.
        _write(config, result)
    result["table"] = markdown_table(result)
    return result


def _write(config: AblationConfig, result: dict[str, Any]) -> pathlib.Path:
    path = pathlib.Path(config.json or pathlib.Path(config.output) / "ablation.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


def _job(config: AblationConfig) -> None:
    config = dataclasses.replace(config, flagfile=real.resolve_flagfile(config.flagfile))
    result = run(config)
    path = _write(config, result)
    print(result["table"])
    print(f"wrote {path}", file=sys.stderr)


def main(argv: Sequence[str]) -> int:
    """Runs the ablation on `argv` (argv[0] is the program); returns the exit status."""
    return real.main_with_flagfile("benchmark_ablation", AblationConfig, _job, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
