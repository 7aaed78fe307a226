"""What a newcomer meets first: the help screen, the flags' spellings, a mistyped flag, a run's progress in a
log, the curves of a short run, the loaders' default, and class names for ImageNet's folder names."""
import argparse
import os
import re
import time

import matplotlib
import pytest
import torch

import noah
import train

matplotlib.use("Agg")


def test_the_help_shows_its_groups_and_no_wall_of_presets(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    usage = text.split("\n\n")[0]
    assert len(usage) < 120 and "noah_resnet18" not in usage  # no preset list in the usage line
    for title in ("data", "model", "optimization", "speed", "checkpoints and evaluation"):
        assert re.search(rf"^{title}\b.*:$", text, re.M), title
    assert "(default: None)" not in text and "(default: )" not in text
    assert re.search(r"^  resnet +resnet18, resnet34", text, re.M)  # the models, by family, at the end
    assert "--use-noah" not in text.split("usage")[0] and text.count("--use_noah,") == 1  # one entry a flag


def test_every_flag_says_what_it_does():
    parser = train.get_parser()
    silent = [action.option_strings[0] for action in parser._actions
              if not action.help and action.option_strings != ["-h", "--help"]]
    assert silent == []


@pytest.mark.parametrize("original, hyphenated, value", [
    (["--use_noah"], ["--use-noah"], True), (["--head_num", "2"], ["--head-num", "2"], 2),
    (["--key_ratio", "0.25"], ["--key-ratio", "0.25"], 0.25), (["--manualSeed", "7"], ["--manual-seed", "7"], 7),
    (["--use_amp"], ["--use-amp"], True), (["--no-use_noah"], ["--no-use-noah"], False),
])
def test_the_originals_flags_take_hyphens_too(original, hyphenated, value):
    dest = {"--use_noah": "use_noah", "--head_num": "head_num", "--key_ratio": "key_ratio", "--manualSeed":
            "manualSeed", "--use_amp": "use_amp", "--no-use_noah": "use_noah"}[original[0]]
    for flags in (original, hyphenated):
        args = train.parse_args(["--dataset", "fake", "--use_noah", *flags])
        assert getattr(args, dest) == value, flags
    assert train.explicit_flags(hyphenated) == {dest: value}  # a resumed run sees the flag as given


@pytest.mark.parametrize("argv, message", [
    (["--use-noah", "--img_size", "64"], "--img_size: unknown; did you mean --img-size?"),
    (["--manual_seed", "3"], "--manual_seed: unknown; did you mean --manualSeed?"),
    (["--frobnicate"], "--frobnicate: unknown; see --help"),
])
def test_a_mistyped_flag_gets_one_line_with_the_closest_real_one(argv, message):
    with pytest.raises(train.UserError) as error:
        train.parse_args(argv)
    assert str(error.value) == message


def test_a_run_into_a_log_prints_progress_lines_during_the_epoch(tmp_path, capsys):
    common = ["--dataset", "shapes", "--img-size", "32", "--train-size", "82", "--val-size", "8", "--train-batch", "2",
              "--lr", "0.01", "--manualSeed", "0", "--epochs", "1", "--workers", "0", "--checkpoint", str(tmp_path)]
    train.main(common + ["--log-interval", "0"])  # capsys: stdout is no terminal, as in a log
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  epoch")]
    assert len(lines) == 2  # 41 steps: the loss is read at steps 20 and 40
    assert re.fullmatch(r"  epoch 1/1  step 20/41  \d+ img/s  loss \d+\.\d{4}  lr 0\.01  ETA \d+:\d\d", lines[0])
    train.main(common + ["--log-interval", "3600", "--checkpoint", str(tmp_path / "quiet")])
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("  epoch")]


@pytest.mark.parametrize("seconds_left, shown", [(59.7, "ETA 1:00"), (59.2, "ETA 0:59"), (3599.6, "ETA 60:00")])
def test_the_progress_line_rounds_the_time_left_to_whole_seconds(seconds_left, shown, capsys):
    args = argparse.Namespace(epochs=1)
    train.progress_line(0, 1, 2, 64, 64.0, 0.01, time.time() - seconds_left, args)  # one step of two: left = elapsed
    assert capsys.readouterr().out.rstrip().endswith(shown)


def test_the_curves_of_a_one_epoch_run_show_a_point_at_epoch_one(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(train.Figure, "savefig", lambda figure, *args, **kwargs: figures.append(figure))
    record = dict(epoch=1, train_loss=1.0, val_loss=1.2, train_top1=50.0, val_top1=40.0)
    train.plot_curves([record], tmp_path / "curves.png")
    for ax in figures[0].axes:
        assert all(line.get_marker() == "o" for line in ax.get_lines())
        assert ax.get_xlim() == (0.5, 1.5)
        assert [tick for tick in ax.get_xticks() if 0.5 <= tick <= 1.5] == [1.0]


def test_the_loaders_default_to_the_cores_each_process_has(monkeypatch):
    """No cap with a GPU, which trains thousands of images a second and needs every core's loader (a node of 8 GPUs
    and 128 cores: 16 a process); on a CPU half of them, the training computing on the rest."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.parse_args(["--dataset", "fake"]).workers == 128
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun with 8 processes on the node
    assert train.parse_args(["--dataset", "fake"]).workers == 16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.parse_args(["--dataset", "fake"]).workers == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert train.parse_args(["--dataset", "fake"]).workers == 1  # this project's 2-core machine


def test_figures_name_imagenet_folders_by_their_class():
    assert [noah.class_name(["n03888257", "n01440764", "plum"], k) for k in range(3)] == ["parachute", "tench", "plum"]
    names = noah.imagenet_names()
    assert len(names) == 1000 and list(names) == sorted(names)  # ImageNet's order is its sorted ids
    assert names["n15075141"] == "toilet tissue"
