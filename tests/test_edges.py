"""Every promise at its edges: exact resume whatever the workers with MixUp on, resume with changed flags,
validation that cannot score, the EMA weights, figures from any checkpoint, and the Python helpers' inputs."""
import json
import math
import os

import matplotlib
import matplotlib.pyplot
import pytest
import torch
from PIL import Image

import data
import noah
import train
from helpers import build, fails_cleanly, read_log, run, small_run, weights

matplotlib.use("Agg")


def saved_run(path, classes=("apple", "pear", "plum"), **args):
    """A train.py checkpoint of a NOAH ResNet18 (random weights) as a run on `classes` writes it."""
    flags = train.parse_args(["--data", "D", "--arch", "resnet18", "--use_noah", "--img-size", "32", "--workers", "0"])
    vars(flags).update(args)
    torch.manual_seed(0)
    model = noah.create_model("resnet18", num_classes=len(classes))
    torch.save(dict(epoch=1, arch="resnet18", config=dict(arch="resnet18", use_noah=True, head_num=4, key_ratio=0.5),
                    classes=list(classes), acc=0.0, best_acc=0.0, state_dict=model.state_dict(), args=vars(flags)),
               path)
    return path


# --- 1. exact resume whatever the workers, with MixUp / CutMix ----------------------------------------------------


@pytest.mark.slow
def test_mixup_and_cutmix_give_the_same_weights_whatever_the_workers(image_folder, tmp_path):
    for workers in (0, 1, 2):
        run(small_run(image_folder, tmp_path / str(workers), "--mixup", 0.8, "--cutmix", 1.0, "--workers", workers))
    trained = [weights(tmp_path / str(workers) / "checkpoint.pth.tar") for workers in (0, 1, 2)]
    assert all(torch.equal(trained[0][k], other[k]) for other in trained[1:] for k in trained[0])


def test_loading_a_sample_leaves_the_loading_processs_random_numbers_alone(image_folder):
    """With --workers 0 the samples load in the main process, whose random numbers MixUp draws next."""
    args = train.parse_args(["--data", str(image_folder), "--img-size", "32", "--randaug", "9"])
    train_set, _, _ = data.build_datasets(args)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    data.Samples(train_set)[(0, 12345)]
    assert torch.equal(torch.rand(3), expected)


# --- 2, 3. resume with changed flags ------------------------------------------------------------------------------


def resumed(tmp_path, *argv):
    argv = [str(a) for a in argv]
    args = train.parse_args(argv)
    overrides = train.restore_arguments(args, argv, train.read_checkpoint_file(args.resume))
    return args, overrides


def test_a_resumed_deit_run_with_another_batch_rescales_its_lr_unless_lr_is_given(tmp_path):
    batch4 = train.parse_args(["--preset", "noah_deit_tiny_patch16_224", "--data", "D", "--train-batch", "4"])
    path = saved_run(tmp_path / "deit.pth.tar", **vars(batch4))
    args, overrides = resumed(tmp_path, "--resume", path, "--train-batch", 512)
    assert args.lr == pytest.approx(5e-4)  # what the fresh preset gives at 512
    assert any("--lr follows the batch" in line for line in overrides)
    args, _ = resumed(tmp_path, "--resume", path, "--train-batch", 512, "--lr", 1e-4)
    assert args.lr == 1e-4
    args, _ = resumed(tmp_path, "--resume", path)
    assert args.lr == pytest.approx(5e-4 * 4 / 512)


def test_a_resnet_run_keeps_its_lr_with_another_batch(tmp_path):  # the original's SGD recipes set no lr per batch
    path = saved_run(tmp_path / "r.pth.tar", **vars(train.parse_args(["--preset", "noah_resnet18", "--data", "D"])))
    args, _ = resumed(tmp_path, "--resume", path, "--train-batch", 64)
    assert args.lr == 0.1


def test_another_preset_for_a_resumed_run_is_refused_in_one_line(tmp_path):
    path = saved_run(tmp_path / "r.pth.tar", **vars(train.parse_args(["--preset", "noah_resnet18", "--data", "D"])))
    with pytest.raises(train.UserError) as error:
        resumed(tmp_path, "--resume", path, "--preset", "noah_deit_tiny_050_patch16_224")
    assert "continues a run of --preset noah_resnet18" in str(error.value) and "--pretrained-backbone" in str(
        error.value)
    args, _ = resumed(tmp_path, "--resume", path, "--preset", "noah_resnet18")  # the same preset: nothing to refuse
    assert args.arch == "resnet18"


# --- 4, 7. validation that cannot score ---------------------------------------------------------------------------


@pytest.mark.slow
def test_non_finite_validation_outputs_stop_the_run_and_never_become_best(image_folder, tmp_path):
    run(small_run(image_folder, tmp_path))
    state = torch.load(tmp_path / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    state["state_dict"]["bn1.running_mean"].fill_(math.nan)  # training uses the batch's statistics: finite;
    torch.save(state, tmp_path / "checkpoint.pth.tar")  # evaluation uses the running ones: NaN logits
    best_before = (tmp_path / "model_best.pth.tar").read_bytes()
    done = run(small_run(image_folder, tmp_path, "--epochs", 2, "--resume", tmp_path / "checkpoint.pth.tar"),
               check=False)
    fails_cleanly(done, "the validation loss after epoch 2 became nan")
    assert (tmp_path / "model_best.pth.tar").read_bytes() == best_before
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "log.jsonl")] == [1]  # valid JSON, no NaN
    done = run(small_run(image_folder, tmp_path, "--evaluate", "--resume", tmp_path / "checkpoint.pth.tar"),
               check=False)
    fails_cleanly(done, "the validation loss is nan: the model's outputs are not finite")


def test_a_validation_set_with_no_readable_image_stops_in_one_line(image_folder, tmp_path):
    root = tmp_path / "root"
    for split, files in (("train", 6), ("val", 2)):
        for name in ("apple", "pear"):
            (root / split / name).mkdir(parents=True)
            for i in range(files):
                content = b"not an image" if split == "val" else None
                path = root / split / name / f"{i}.png"
                path.write_bytes(content) if content else Image.new("RGB", (8, 8), (40 * i, 9, 9)).save(path)
    with pytest.raises(train.UserError, match="none of the 4 validation images could be read"):
        train.main([str(a) for a in small_run(root, tmp_path / "run", "--train-batch", 4, "--test-batch", 4)])


# --- 5. a checkpoint of other classes -----------------------------------------------------------------------------


@pytest.mark.parametrize("classes, message", [
    (("dog", "fish", "zebra"), "was trained on other classes than"),
    (("plum", "pear", "apple"), "have the same classes in another order"),
])
def test_evaluating_on_data_of_other_classes_is_refused(image_folder, tmp_path, classes, message):
    path = saved_run(tmp_path / "other.pth.tar", classes=classes)
    with pytest.raises(train.UserError, match=message):
        train.main(["--data", str(image_folder), "--evaluate", "--resume", str(path), "--workers", "0"])


# --- 6, 9, 11. figures from any checkpoint ------------------------------------------------------------------------


def test_show_evidence_and_pocas_cap_top_k_at_the_number_of_classes():
    model = build("resnet18", num_classes=3)
    for figure in (noah.show_evidence({"NOAH": model}, torch.randn(3, 64, 64), top_k=5),
                   noah.show_pocas(model, torch.randn(3, 64, 64), top_k=5)):
        rows = [ax.get_ylabel() for ax in figure.axes if ax.get_ylabel().startswith("class ")]
        assert sorted(label.split(" (")[0] for label in rows) == ["class 0", "class 1", "class 2"]
        matplotlib.pyplot.close(figure)


def test_show_pocas_takes_the_class_count_from_a_bare_state_dict_and_names_figures_apart(image_folder, tmp_path):
    torch.save(build("resnet18", num_classes=10).state_dict(), tmp_path / "bare.pth")
    open_figures = matplotlib.pyplot.get_fignums()
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        Image.new("L", (40, 40), 128).save(folder / "gray.png")
    paths = train.main(["--arch", "resnet18", "--use_noah", "--resume", str(tmp_path / "bare.pth"), "--img-size",
                        "32", "--show-pocas", str(a / "gray.png"), str(b / "gray.png"), "--top-k", "5",
                        "--checkpoint", str(tmp_path / "maps")])
    assert sorted(os.path.basename(p) for p in paths) == ["evidence_gray.png", "evidence_gray_2.png",
                                                          "pocas_gray.png", "pocas_gray_2.png"]
    assert len(set(paths)) == 4 and all(os.path.getsize(p) > 0 for p in paths)
    assert matplotlib.pyplot.get_fignums() == open_figures  # each closed once written: many images would fill memory
    args = train.parse_args(["--arch", "resnet18", "--use_noah", "--resume", "x", "--show-pocas", "y"])
    checkpoint = {"state_dict": build("resnet18", num_classes=10).state_dict()}
    assert train.figure_classes(checkpoint, args) == [str(k) for k in range(10)]
    assert train.figure_classes({"state_dict": build("resnet18", "gap").state_dict()}, args)[0] == "tench"
    args = train.parse_args(["--arch", "resnet18", "--use_noah", "--resume", "x", "--show-pocas", "y", "--data",
                             str(image_folder)])
    assert train.figure_classes(checkpoint, args) == ["apple", "pear", "plum"]  # the data's names, when given


# --- 8. the EMA weights --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ema_weights_load_in_python_alone_in_a_file_and_are_evaluated_with_ema(image_folder, tmp_path):
    run(small_run(image_folder, tmp_path, "--model-ema", "--ema-decay", 0.5))
    checkpoint = noah.read_checkpoint(tmp_path / "checkpoint.pth.tar")
    model = noah.load_checkpoint(noah.create_model("resnet18", num_classes=3), checkpoint["ema"])
    ema_state = {k.removeprefix("module."): v for k, v in checkpoint["ema"].items() if k != "n_averaged"}
    assert all(torch.equal(v, ema_state[k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, checkpoint["state_dict"][k]) for k, v in model.state_dict().items())
    torch.save({"ema": checkpoint["ema"]}, tmp_path / "ema_only.pth")
    alone = noah.load_checkpoint(noah.create_model("resnet18", num_classes=3), tmp_path / "ema_only.pth")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in alone.state_dict().items())
    logged = read_log(tmp_path)[0]
    for flags, key in ((["--ema"], "ema_val_top1"), ([], "val_top1")):
        done = run(small_run(image_folder, tmp_path, "--evaluate", "--resume", tmp_path / "checkpoint.pth.tar",
                             *flags))
        assert f"top-1 {logged[key]:.2f}%" in done.stdout
    no_ema = saved_run(tmp_path / "no_ema.pth.tar")
    with pytest.raises(train.UserError, match="holds no EMA weights"):
        train.main(["--data", str(image_folder), "--evaluate", "--ema", "--resume", str(no_ema), "--workers", "0"])


# --- 10, 13. figures: one scale per kind, any image and normalization ---------------------------------------------


def test_show_evidence_puts_every_attention_panel_on_one_scale_and_names_each_grid():
    noah_model, other = build("resnet18", num_classes=5), build("mobilenetv2_035", num_classes=5)
    figure = noah.show_evidence({"R18": noah_model, "MNv2": other}, torch.randn(3, 96, 96), top_k=3)
    attention = [image for ax in figure.axes for image in ax.get_images()[1:] if image.get_cmap().name == "viridis"]
    assert len(attention) == 6 and len({image.get_clim() for image in attention}) == 1
    assert max(image.get_array().max() for image in attention) == pytest.approx(attention[0].get_clim()[1])
    title = figure._suptitle.get_text()
    assert "3 x 3 (R18)" in title and "3 x 3 (MNv2)" in title or "the 3 x 3 feature grid" in title
    matplotlib.pyplot.close(figure)
    small = noah.create_model("resnet18", num_classes=5)  # at 64 pixels a 2 x 2 grid, MobileNetV2's too
    figure = noah.show_evidence({"R18": small, "GAP": build("resnet18", "gap", num_classes=5)}, torch.randn(3, 64, 64))
    assert "the 2 x 2 feature grid" in figure._suptitle.get_text()
    matplotlib.pyplot.close(figure)


def test_figures_take_a_batch_of_one_and_normalization_as_tensors():
    model = build("resnet18", num_classes=5)
    batch, mean, std = torch.randn(1, 3, 64, 64), torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.25, 0.25, 0.25])
    for figure in (noah.show_pocas(model, batch, mean=mean, std=std),
                   noah.show_evidence({"NOAH": model}, batch, mean=mean, std=std)):
        picture = figure.axes[0].get_images()[0].get_array()
        expected = (batch[0] * 0.25 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
        assert abs(picture - expected).max() < 1e-6
        matplotlib.pyplot.close(figure)
    with pytest.raises(ValueError, match=r"give one image, \(3, height, width\) or \(1, 3, height, width\)"):
        noah.show_pocas(model, torch.randn(2, 3, 64, 64))


# --- 12. a CIFAR folder that fails its checksum --------------------------------------------------------------------


def test_a_cifar_folder_that_fails_its_checksum_is_not_called_missing(monkeypatch, tmp_path):
    from torchvision import datasets

    def offline(*args, download=False, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(datasets, "CIFAR10", type("CIFAR10", (), {"url": datasets.CIFAR10.url, "base_folder":
                                                                   "cifar-10-batches-py", "__new__": offline}))
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(train.UserError) as error:
        data.build_datasets(train.parse_args(["--dataset", "cifar10", "--data", str(tmp_path)]))
    assert "cifar-10-batches-py exists, but its files failed torchvision's checksum" in str(error.value)
