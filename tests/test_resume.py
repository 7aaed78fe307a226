"""What a resume says it changes, it changes: the optimizer's hyperparameters given on resuming act from the first
resumed step (read in the optimizer groups of the next checkpoint), another --opt starts its state anew with a
line saying so, and what describes the machine is chosen again where the run resumes."""
import pytest
import torch

import train
from helpers import last_checkpoint, small_run


def resume(capsys, folder, *flags):
    """One more epoch of the run in `folder`, with `flags` -> the lines it printed."""
    train.main([str(a) for a in ["--resume", folder / "checkpoint.pth.tar", "--epochs", 2, "--workers", 0, *flags]])
    return capsys.readouterr().out.splitlines()


def first_epoch(image_folder, folder, capsys, *flags):
    train.main([str(a) for a in small_run(image_folder, folder, "--precision", "float32", *flags)])
    capsys.readouterr()


def test_a_resume_says_where_it_continues(image_folder, tmp_path, capsys):
    first_epoch(image_folder, tmp_path, capsys)
    best = last_checkpoint(tmp_path)["best_acc"]
    lines = resume(capsys, tmp_path)
    assert f"resuming after epoch 1 of 2 (best top-1 {best:.2f}%)" in lines
    assert not any("the run continues in" in line for line in lines)  # the same precision: nothing more to say


@pytest.mark.parametrize("flag, value, key", [("--wd", 0.0, "weight_decay"), ("--momentum", 0.5, "momentum")])
def test_an_optimizer_flag_given_on_resuming_reaches_every_group(image_folder, tmp_path, capsys, flag, value, key):
    first_epoch(image_folder, tmp_path, capsys, "--wd", 0.05)
    assert {group[key] for group in last_checkpoint(tmp_path)["optimizer"]["param_groups"]} != {value}
    lines = resume(capsys, tmp_path, flag, value)
    assert any(line.startswith(f"{flag} {value} overrides the resumed run's") for line in lines)
    assert {group[key] for group in last_checkpoint(tmp_path)["optimizer"]["param_groups"]} == {value}
    assert last_checkpoint(tmp_path)["epoch"] == 2


def test_adamws_epsilon_given_on_resuming_is_used(image_folder, tmp_path, capsys):
    first_epoch(image_folder, tmp_path, capsys, "--opt", "adamw")
    resume(capsys, tmp_path, "--opt-eps", 1e-3)
    assert {group["eps"] for group in last_checkpoint(tmp_path)["optimizer"]["param_groups"]} == {1e-3}


def test_a_new_backbone_lr_scale_regroups_the_parameters_and_keeps_their_state(image_folder, tmp_path, capsys):
    first_epoch(image_folder, tmp_path, capsys)
    before = last_checkpoint(tmp_path)["optimizer"]
    resume(capsys, tmp_path, "--backbone-lr-scale", 0.5)
    groups = last_checkpoint(tmp_path)["optimizer"]["param_groups"]
    assert sorted(group["lr_scale"] for group in groups) == [0.5, 1.0]  # the backbone's, the head's
    head = next(group for group in groups if group["lr_scale"] == 1.0)
    assert all(group["lr"] == pytest.approx(head["lr"] * group["lr_scale"]) for group in groups)
    assert len(last_checkpoint(tmp_path)["optimizer"]["state"]) == len(before["state"])  # every momentum came along


def test_nowd_bn_given_on_resuming_exempts_norms_and_biases(image_folder, tmp_path, capsys):
    first_epoch(image_folder, tmp_path, capsys, "--wd", 0.05)
    resume(capsys, tmp_path, "--nowd-bn")
    decays = sorted(group["weight_decay"] for group in last_checkpoint(tmp_path)["optimizer"]["param_groups"])
    assert decays == [0.0, 0.05]


def test_another_optimizer_on_resuming_starts_its_state_anew_and_says_so(image_folder, tmp_path, capsys):
    first_epoch(image_folder, tmp_path, capsys)  # SGD
    lines = resume(capsys, tmp_path, "--opt", "adamw")
    assert "--opt adamw: the resumed run used sgd, whose state adamw cannot use; the optimizer's state starts anew" \
        in lines
    state = last_checkpoint(tmp_path)["optimizer"]["state"]
    assert all("exp_avg" in value and "momentum_buffer" not in value for value in state.values())
    assert all(float(value["step"]) == 3 for value in state.values())  # one epoch (24 images, batches of 8), not two


def test_a_plain_resume_restores_every_hyperparameter_of_the_run(image_folder, tmp_path, capsys):
    first_epoch(image_folder, tmp_path, capsys, "--wd", 0.05, "--momentum", 0.8, "--backbone-lr-scale", 0.3)
    resume(capsys, tmp_path)
    groups = last_checkpoint(tmp_path)["optimizer"]["param_groups"]
    assert {(group["weight_decay"], group["momentum"]) for group in groups} == {(0.05, 0.8)}
    assert sorted(group["lr_scale"] for group in groups) == [0.3, 1.0]


def test_a_preset_flag_newer_than_the_checkpoint_takes_its_default_not_the_presets(image_folder, tmp_path, capsys,
                                                                                    monkeypatch):
    first_epoch(image_folder, tmp_path, capsys)
    older = last_checkpoint(tmp_path)  # as a checkpoint written before these flags existed
    for key in ("crop_scale", "lr_per_step"):
        del older["args"][key]
    torch.save(older, tmp_path / "checkpoint.pth.tar")
    monkeypatch.setitem(train.PRESETS, "quick", dict(train.PRESETS["quick"], crop_scale=[0.5, 1.0], lr_per_step=True))
    resume(capsys, tmp_path)  # --resume alone parses with the quick preset's defaults
    assert last_checkpoint(tmp_path)["args"]["crop_scale"] == [0.08, 1.0]
    assert last_checkpoint(tmp_path)["args"]["lr_per_step"] is False

