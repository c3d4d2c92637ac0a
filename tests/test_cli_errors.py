"""The error contract: every settings mistake a user can make ends with one line and exit 2."""

from __future__ import annotations

import pytest

from boneage_tpu.cli import evaluate, predict, train

# (command, its main, extra flags; DATA and OUT stand for a toy data folder and a fresh folder,
# the start of the one error line).
BAD_COMBINATIONS = [
    (
        "train",
        train.main,
        ["--fit_bias_correction", "--val_split="],
        "--fit_bias_correction needs --data and a --val_split",
    ),
    ("train", train.main, ["--fold=0"], "--fold 0: DATA has no folds"),
    (
        "train",
        train.main,
        ["--optimizer=adam", "--weight_decay=0.01"],
        "--weight_decay needs --optimizer adamw",
    ),
    (
        "evaluate",
        evaluate.main,
        ["--model_dir=OUT/b", "--continuous"],
        "--continuous follows one training run",
    ),
    (
        "evaluate",
        evaluate.main,
        ["--continuous", "--checkpoint=5"],
        "--continuous evaluates every new checkpoint",
    ),
    ("predict", predict.main, [], "no images: give IMAGE files"),
    ("predict", predict.main, ["--labels=x.csv", "a.png"], "use either IMAGE files or --labels"),
    ("predict", predict.main, ["--sex=X", "a.png"], "--sex must be M or F"),
]


@pytest.mark.parametrize(("prog", "main", "extra", "message"), BAD_COMBINATIONS)
def test_bad_combinations_are_one_line_usage_errors(
    tmp_path, capsys, toy_data, prog, main, extra, message
):
    out = str(tmp_path / "out")
    base = {
        "train": [f"--data={toy_data}", f"--model_dir={out}/a", "--backbone=tiny"],
        "evaluate": [f"--data={toy_data}", f"--model_dir={out}/a"],
        "predict": [f"--model={out}/a"],
    }[prog]
    argv = [prog, *base, *(a.replace("OUT", out) for a in extra)]
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: {message.replace('DATA', toy_data)}"), err
