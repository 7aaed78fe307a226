"""train.py on the CPU: one process and torchrun, exact resumption, evaluation, presets, checkpoints of other
programs, POCA figures, bad input. Tests marked slow run train.py in its own process, as a user would."""
import dataclasses
import math
import os
import re
import shlex
from types import SimpleNamespace

import pytest
import torch
import torchvision
from PIL import Image

import data
import train
from helpers import build, fails_cleanly, read_log, run, save_original_checkpoint, small_run, weights


@pytest.fixture(scope="module")
def one_epoch(image_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    run(small_run(image_folder, folder))
    return folder


@pytest.mark.slow
def test_one_epoch_on_an_image_folder(one_epoch):
    assert sorted(os.listdir(one_epoch)) == ["checkpoint.pth.tar", "curves.png", "log.jsonl", "model_best.pth.tar"]
    state = torch.load(one_epoch / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert {"epoch", "state_dict", "best_acc", "optimizer", "scaler", "args", "config"} <= set(state)
    assert state["epoch"] == 1 and state["config"]["arch"] == "resnet18" and state["config"]["use_noah"]
    (record,) = read_log(one_epoch)
    assert record["epoch"] == 1 and 0 <= record["val_top1"] <= 100 and record["train_loss"] > 0
    assert (one_epoch / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_torchrun_with_two_processes_on_cpu_writes_one_checkpoint(image_folder, tmp_path):
    done = run(small_run(image_folder, tmp_path), nproc=2)
    assert "2 process(es) on cpu" in done.stdout
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth.tar", "curves.png", "log.jsonl", "model_best.pth.tar"]
    assert len(read_log(tmp_path)) == 1


@pytest.mark.slow
def test_resume_continues_exactly(image_folder, tmp_path):
    """Two epochs straight, and one epoch + resume + one epoch, give the same weights; with persistent
    data-loading workers, which keep their own random state across epochs (in float32: test_precision.py has
    bfloat16)."""
    common = ["--workers", 2, "--dropout", 0.3, "--precision", "float32"]  # dropout and augmentation draw numbers
    run(small_run(image_folder, tmp_path / "straight", *common, "--epochs", 2))
    run(small_run(image_folder, tmp_path / "resumed", *common))
    run(small_run(image_folder, tmp_path / "resumed", *common, "--epochs", 2,
                  "--resume", tmp_path / "resumed" / "checkpoint.pth.tar"))  # writes beside --resume
    straight = weights(tmp_path / "straight" / "checkpoint.pth.tar")
    resumed = weights(tmp_path / "resumed" / "checkpoint.pth.tar")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    log_straight, log_resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [r["val_loss"] for r in log_straight] == [r["val_loss"] for r in log_resumed]


@pytest.mark.slow
def test_the_vit_and_mlp_recipe_options_train_together(image_folder, tmp_path):
    run(small_run(image_folder, tmp_path, "--arch", "deit_tiny_patch16_224", "--opt", "adamw", "--lr", 1e-3,
                  "--warmup-epochs", 1, "--epochs", 2, "--mixup", 0.8, "--cutmix", 1.0, "--smoothing", 0.1,
                  "--randaug", 9, "--reprob", 0.25, "--model-ema", "--ema-decay", 0.9, "--repeated-aug", 3,
                  "--clip-grad", 1.0, "--drop-path", 0.1, "--nowd-bn"))
    log = read_log(tmp_path)
    assert [r["lr"] for r in log] == [1e-6, pytest.approx(1e-3 * (1 + math.cos(math.pi / 2)) / 2)]
    assert all(r["train_top1"] is None and 0 <= r["ema_val_top1"] <= 100 for r in log)  # mixed targets: no train top-1
    assert "ema" in torch.load(tmp_path / "checkpoint.pth.tar", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_speed_options_on_cpu(image_folder, tmp_path):
    run(small_run(image_folder, tmp_path, "--channels-last", "--use_amp", "--amp-dtype", "bfloat16"))
    assert read_log(tmp_path)[0]["train_loss"] > 0


def evaluated_top1(output):
    return float(re.search(r"top-1 ([\d.]+)% top-5 ([\d.]+)% on (\d+) images", output).group(1))


@pytest.mark.slow
def test_evaluate_reproduces_the_logged_accuracy_with_one_and_two_processes(image_folder, one_epoch):
    logged = read_log(one_epoch)[0]["val_top1"]
    args = small_run(image_folder, one_epoch, "--evaluate", "--resume", one_epoch / "checkpoint.pth.tar")
    single, double = run(args), run(args, nproc=2)
    assert evaluated_top1(single.stdout) == pytest.approx(logged, abs=0.005)
    assert evaluated_top1(double.stdout) == evaluated_top1(single.stdout)
    assert "on 12 images" in double.stdout  # each of the 12 validation images once, none padded in


def test_validation_counts_every_image_once_whatever_the_processes(image_folder):
    args = train.parse_args(["--data", str(image_folder), "--workers", "0", "--manualSeed", "0", "--train-batch", "5"])
    _, val_set, _ = data.build_datasets(args)
    for world in (1, 2, 3, 5):
        loaders = [data.build_loaders(args, val_set, val_set, world, rank, False)[1] for rank in range(world)]
        shares = [[index for index, _ in loader.sampler] for loader in loaders]
        assert sorted(i for share in shares for i in share) == list(range(len(val_set)))


ORIGINAL_COMMANDS = {  # the original README's commands, launcher replaced
    "noah_resnet18": "--arch resnet18 --epochs 100 --lr 0.1 --wd 1e-4 --lr-decay schedule --schedule 30 60 90 "
                     "--use_noah --head_num 4 --key_ratio 0.5 --dropout 0.1 --data D "
                     "--checkpoint ./checkpoints/noah_resnet18",
    "resnet18": "--arch resnet18 --epochs 100 --lr 0.1 --wd 1e-4 --lr-decay schedule --schedule 30 60 90 --dropout 0.1 "
                "--data D --checkpoint ./checkpoints/resnet18",
    "noah_mobilenetv2_100": "--arch mobilenetv2_100 --epochs 150 --lr 0.05 --wd 4e-5 --lr-decay cos --use_noah "
                            "--head_num 8 --key_ratio 0.25 --dropout 0.2 --data D "
                            "--checkpoint ./checkpoints/noah_mobilenetv2_100",
    "noah_mobilenetv3_small": "--arch mobilenetv3_small --epochs 150 --lr 0.05 --wd 4e-5 --lr-decay cos --use_noah "
                              "--head_num 8 --key_ratio 0.25 --dropout 0.2 --nowd-bn --data D "
                              "--checkpoint ./checkpoints/noah_mobilenetv3_small",
    "noah_shufflenetv2_100": "--arch shufflenetv2_100 --epochs 240 --lr 0.5 --wd 4e-5 --train-batch 1024 "
                             "--lr-decay linear "
                             "--use_noah --head_num 8 --key_ratio 0.25 --dropout 0 --nowd-bn --data D "
                             "--checkpoint ./checkpoints/noah_shufflenetv2_100",
}


@pytest.mark.parametrize("preset", ORIGINAL_COMMANDS)
def test_presets_expand_to_the_original_commands(preset):
    original = vars(train.parse_args(shlex.split(ORIGINAL_COMMANDS[preset])))
    expanded = vars(train.parse_args(["--preset", preset, "--data", "D"]))
    differing = {k: (original[k], expanded[k]) for k in original if original[k] != expanded[k]}
    assert differing == {"preset": (None, preset)}


def test_presets_cover_every_width_and_depth_with_their_family_recipe():
    resnet50 = train.parse_args(["--preset", "noah_resnet50", "--data", "D"])
    assert (resnet50.head_num, resnet50.key_ratio, resnet50.epochs, resnet50.schedule) == (4, 1 / 8, 100, [30, 60, 90])
    mobilenet = train.parse_args(["--preset", "mobilenetv2_035", "--data", "D"])
    assert (mobilenet.use_noah, mobilenet.lr, mobilenet.lr_decay, mobilenet.epochs) == (False, 0.05, "cos", 150)
    deit = train.parse_args(["--preset", "noah_deit_tiny_patch16_224", "--data", "D"])
    assert (deit.opt, deit.lr, deit.wd, deit.warmup_epochs, deit.smoothing, deit.mixup, deit.cutmix, deit.drop_path,
            deit.model_ema, deit.repeated_aug, deit.head_num, deit.key_ratio) == (
        "adamw", 5e-4 * 1024 / 512, 0.05, 5, 0.1, 0.8, 1.0, 0.1, True, 3, 4, 0.5)
    assert not train.parse_args(["--preset", "pvt_tiny", "--data", "D"]).model_ema
    gmlp = train.parse_args(["--preset", "noah_gmlp_ti16_224", "--data", "D"])
    assert (gmlp.lr, gmlp.wd, gmlp.warmup_epochs, gmlp.clip_grad, gmlp.mixup, gmlp.ema_decay, gmlp.drop, gmlp.normalize,
            gmlp.crop_pct) == (7e-4, 0.067, 20, 1.0, 0.5, 0.99992, 0.02333, "inception", 0.9)
    assert (deit.normalize, deit.crop_pct, deit.interpolation) == ("imagenet", 0.875, "bicubic")
    assert set(train.PRESETS) >= {f"noah_{name}" for name in train.noah.list_models()} | set(train.noah.list_models())


def test_flags_on_the_command_line_win_over_the_preset():
    args = train.parse_args(["--preset", "noah_resnet18", "--data", "D", "--epochs", "3", "--no-use_noah"])
    assert (args.epochs, args.use_noah, args.lr) == (3, False, 0.1)


def test_no_arguments_is_the_quick_run_and_data_alone_is_the_original_default():
    quick = train.parse_args([])
    assert (quick.preset, quick.dataset, quick.arch, quick.use_noah, quick.img_size) == (
        "quick", "shapes", "resnet18", True, 64)
    original = train.parse_args(["--data", "D"])
    assert (original.preset, original.dataset, original.use_noah, original.img_size) == (None, "imagenet", False, 224)


def test_a_model_of_a_family_without_a_recipe_is_a_clear_error(monkeypatch):
    entry = dataclasses.replace(train.noah.MODELS["resnet18"], family="newnet")
    monkeypatch.setitem(train.noah.MODELS, "newnet", entry)
    with pytest.raises(ValueError, match="model newnet belongs to the family 'newnet', which has no training recipe: "
                                         "add one to train.RECIPES"):
        train.make_presets()


def test_evaluation_settings_come_from_the_model_unless_given():
    for arch, expected in [("mixer_s16_224", ("inception", 0.9, "bicubic")),
                           ("pvt_tiny", ("imagenet", 0.875, "bicubic")), ("resnet50", ("imagenet", 0.875, "bilinear"))]:
        args = train.parse_args(["--arch", arch, "--data", "D"])
        assert (args.normalize, args.crop_pct, args.interpolation) == expected
    given = train.parse_args(["--arch", "mixer_s16_224", "--data", "D", "--normalize", "imagenet", "--crop-pct", "1.0",
                              "--interpolation", "bilinear"])
    assert (given.normalize, given.crop_pct, given.interpolation) == ("imagenet", 1.0, "bilinear")


def test_eval_transform_resizes_crops_the_centre_and_normalizes():
    picture = Image.new("RGB", (120, 80), (255, 0, 0))
    picture.paste((0, 0, 255), (0, 0, 20, 80))  # a blue band on the left, cut off by the centre crop
    image = data.eval_transform(32, crop_pct=0.5, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(picture)
    assert image.shape == (3, 32, 32)  # 80 -> 64 pixels high, then the central 32 x 32
    torch.testing.assert_close(image[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]))
    assert image[2].max() < -0.9  # no blue left


def test_learning_rate_follows_the_original_schedules():
    args = SimpleNamespace(lr=0.1, epochs=100, gamma=0.1, schedule=[30, 60, 90], warmup_epochs=0, warmup_lr=0, min_lr=0,
                           lr_decay="schedule")
    assert [train.lr_at(args, e) for e in (0, 29, 30, 59, 60, 90, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 1e-3, 1e-4, 1e-4])
    args.lr_decay = "cos"
    assert [train.lr_at(args, e) for e in (0, 50, 100)] == pytest.approx([0.1, 0.05, 0.0])
    args.lr_decay = "linear"
    assert [train.lr_at(args, e) for e in (0, 25, 99)] == pytest.approx([0.1, 0.075, 0.001])
    args.warmup_epochs = 5
    args.warmup_lr = 1e-6
    args.min_lr = 1e-5
    args.lr_decay = "cos"
    assert train.lr_at(args, 0) == 1e-6 and train.lr_at(args, 4) == pytest.approx(1e-6 + 4 * (0.1 - 1e-6) / 5)
    assert train.lr_at(args, 5) == pytest.approx(1e-5 + (0.1 - 1e-5) * (1 + math.cos(math.pi * 5 / 100)) / 2)


def lrs_set_in_training(monkeypatch, image_folder, tmp_path, *flags):
    """Every lr train.py sets while it trains 2 epochs of 3 steps (24 images, batch 8), in order."""
    set_so_far, set_learning_rate = [], train.set_learning_rate

    def recording(optimizer, lr):
        set_so_far.append(lr)
        return set_learning_rate(optimizer, lr)

    monkeypatch.setattr(train, "set_learning_rate", recording)
    train.main([str(a) for a in small_run(image_folder, tmp_path, "--epochs", 2, "--warmup-epochs", 1,
                                          "--warmup-lr", 0, "--lr-decay", "cos", *flags)])
    return set_so_far


def test_lr_per_step_warms_up_and_decays_at_every_step(monkeypatch, image_folder, tmp_path):
    per_step = lrs_set_in_training(monkeypatch, image_folder, tmp_path / "step", "--lr-per-step")
    cosine = lambda epoch: 0.01 * (1 + math.cos(math.pi * epoch / 2)) / 2
    # each epoch: its start, then each of its 3 steps at the share of the epoch done
    expected = [0.0, 0.0, 0.01 / 3, 0.02 / 3, cosine(1), cosine(1), cosine(4 / 3), cosine(5 / 3)]
    assert per_step == pytest.approx(expected)
    per_epoch = lrs_set_in_training(monkeypatch, image_folder, tmp_path / "epoch")
    assert per_epoch == pytest.approx([0.0, cosine(1)])  # as the original: once per epoch


def test_crop_scale_sets_the_area_of_the_training_crops():
    default = data.build_transforms(train.parse_args(["--data", "D"]), train=True).transforms[0]
    assert default.scale == (0.08, 1.0)
    args = train.parse_args(["--data", "D", "--crop-scale", "0.35", "1"])
    assert data.build_transforms(args, train=True).transforms[0].scale == (0.35, 1.0)


def test_progressive_resizing_grows_in_steps_of_16_and_ends_at_the_evaluated_size():
    args = train.parse_args(["--data", "D", "--img-size", "128", "--epochs", "20", "--resize-from", "0.75"])
    assert [train.training_size(args, epoch) for epoch in range(20)] == [96] * 8 + [112] * 7 + [128] * 5
    assert train.size_schedule(args) == "epochs 1-8 at 96 px, epochs 9-15 at 112 px, epochs 16-20 at 128 px"
    args = train.parse_args(["--data", "D", "--img-size", "128", "--epochs", "1", "--resize-from", "0.75"])
    assert train.training_size(args, 0) == 128  # a run's last epoch trains at the size it is evaluated at
    args = train.parse_args(["--data", "D", "--img-size", "128", "--epochs", "20"])
    assert {train.training_size(args, epoch) for epoch in range(20)} == {128}
    with pytest.raises(data.UserError, match="--resize-from 1.5: must be in"):
        train.parse_args(["--data", "D", "--resize-from", "1.5"])


def test_progressive_resizing_trains_on_images_of_the_epochs_size(monkeypatch, image_folder, tmp_path, capsys):
    seen = []
    wrap_model = train.wrap_model

    def wrap_and_watch(model, args, procs):
        model.register_forward_pre_hook(lambda module, inputs: seen.append((module.training, inputs[0].shape[-1])))
        return wrap_model(model, args, procs)

    monkeypatch.setattr(train, "wrap_model", wrap_and_watch)
    train.main([str(a) for a in small_run(image_folder, tmp_path, "--epochs", 4, "--resize-from", 0.5)])
    # the ramp spans 3 of the 4 epochs, too few to grow by a step of 16 pixels before it ends
    assert "progressive resizing: epochs 1-3 at 16 px, epoch 4 at 32 px" in capsys.readouterr().out
    trained = [size for training, size in seen if training]  # 3 steps an epoch
    assert trained == [16] * 9 + [32] * 3
    assert {size for training, size in seen if not training} == {32}  # evaluation at --img-size
    assert [record["img_size"] for record in read_log(tmp_path)] == [16, 16, 16, 32]


def test_nowd_bn_decays_only_convolution_and_linear_weights():
    model = train.noah.create_model("resnet18", num_classes=10)
    decay, no_decay = train.param_groups(model, 1e-4, nowd_bn=True)
    names = {id(p): n for n, p in model.named_parameters()}
    convolution_or_linear = lambda n: "conv" in n or "downsample.0" in n or n.endswith(("query.weight", "value.weight"))
    assert {names[id(p)] for p in decay["params"]} == {n for n in names.values() if convolution_or_linear(n)}
    assert no_decay["weight_decay"] == 0 and all(p.ndim <= 2 for p in no_decay["params"])


def test_shapes_are_deterministic_and_boxes_hold_the_object():
    shapes = data.Shapes(60, 64, seed=3)
    for i in range(60):
        image, label, box = shapes.sample(i)
        again, _, _ = shapes.sample(i)
        assert torch.equal(image, again) and label == i % 6
        x0, y0, x1, y1 = box.tolist()
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    assert not torch.equal(data.Shapes(1, 64, seed=4).sample(0)[0], shapes.sample(0)[0])


def test_repeated_augmentation_gives_each_process_its_share():
    dataset = list(range(96))
    samplers = [data.TrainSampler(len(dataset), 4, rank, 3, seed=0) for rank in range(4)]
    drawn = [[index for index, _ in s] for s in samplers]
    assert [len(d) for d in drawn] == [24] * 4
    everything = [i for d in drawn for i in d]
    assert max(everything.count(i) for i in set(everything)) == 3  # up to 3 times, on different processes


def test_two_seeds_shuffle_independently_at_every_pair_of_epochs():
    """A study of seeds needs independent data orders: no epoch of one seed may replay an epoch of another."""
    orders = {}
    for seed in (0, 1, 2):
        sampler = data.TrainSampler(1000, 1, 0, 1, seed=seed)
        for epoch in range(6):
            sampler.set_epoch(epoch)
            orders[seed, epoch] = [index for index, _ in sampler]
    for (seed, epoch), order in orders.items():
        for (other_seed, other_epoch), other in orders.items():
            if seed != other_seed:
                assert order != other, (seed, epoch, other_seed, other_epoch)
                assert order[:10] != other[:10]


@pytest.mark.parametrize("train_split", [True, False])
def test_pictures_travel_as_uint8_and_are_normalized_on_the_device_as_before(image_folder, train_split):
    """The loader's uint8 batch, normalized by data.normalize_batch, is the normalized batch it used to make."""
    args = train.parse_args(["--data", str(image_folder), "--img-size", "32", "--randaug", "9", "--manualSeed", "3",
                             "--crop-pct", "0.8"])
    folder = image_folder / ("train" if train_split else "val")
    made = {}
    for normalize in (True, False):
        transform = data.build_transforms(args, train=train_split, normalize=normalize)
        samples = data.Samples(torchvision.datasets.ImageFolder(folder, transform, loader=data.read_image))
        made[normalize] = torch.stack([samples[(i, 1000 + i)][0] for i in range(len(samples))])
    assert made[False].dtype == torch.uint8 and made[True].dtype == torch.float32
    torch.testing.assert_close(data.normalize_batch(made[False], args.normalize), made[True], rtol=0, atol=1e-5)


def test_a_batch_is_uint8_unless_the_loader_must_normalize(image_folder):
    """Shapes are drawn in float, and RandomErasing's random-normal pixels belong to the normalized scale."""
    for flags, dtype in ((["--data", str(image_folder)], torch.uint8), (["--dataset", "shapes"], torch.float32),
                         (["--data", str(image_folder), "--reprob", "0.5"], torch.float32)):
        args = train.parse_args(flags + ["--img-size", "32", "--train-batch", "4", "--workers", "0", "--manualSeed",
                                         "0"])
        train_set, val_set, _ = data.build_datasets(args)
        loader, _ = data.build_loaders(args, train_set, val_set, 1, 0, False)
        images = next(iter(loader))[0]
        assert images.dtype == dtype, flags
        assert data.normalize_batch(images, args.normalize).dtype == torch.float32


def test_an_epochs_random_numbers_do_not_depend_on_the_data_loading_workers(image_folder):
    args = train.parse_args(["--data", str(image_folder), "--img-size", "32", "--manualSeed", "5",
                             "--train-batch", "6"])
    train_set, val_set, _ = data.build_datasets(args)
    batches = {}
    for workers in (0, 2):
        args.workers = workers
        loader, _ = data.build_loaders(args, train_set, val_set, 1, 0, False)
        loader.sampler.set_epoch(1)
        batches[workers] = torch.cat([images for images, _, _ in loader])
    assert torch.equal(batches[0], batches[2])


# --- checkpoints of other programs, fine-tuning, POCA figures ------------------------------------------------------


@pytest.mark.slow
def test_train_evaluates_an_original_checkpoint_with_the_original_command(image_folder, tmp_path):
    save_original_checkpoint(build("resnet18", num_classes=3), tmp_path / "model_best.pth.tar", "module.")
    done = run(["--arch", "resnet18", "--data", image_folder, "--use_noah", "--head_num", 4, "--key_ratio", 0.5,
                "--evaluate", "--resume", tmp_path / "model_best.pth.tar", "--img-size", 32, "--workers", 0], nproc=2)
    assert re.search(r"top-1 [\d.]+% top-5 [\d.]+% on 12 images", done.stdout)


@pytest.mark.slow
def test_train_fine_tunes_from_torchvision_weights(image_folder, tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    done = run(small_run(image_folder, tmp_path / "run", "--pretrained-backbone", tmp_path / "resnet18.pth",
                         "--backbone-lr-scale", 0.1))
    assert "backbone loaded from" in done.stdout and "the head starts new" in done.stdout
    done = run(small_run(image_folder, tmp_path / "run", "--arch", "resnet50", "--pretrained-backbone",
                         tmp_path / "resnet18.pth"), check=False)
    assert done.returncode == 1 and "cannot give resnet50 with NOAH" in done.stderr
    assert "the file seems to be for resnet18 with the standard head, 1000 classes" in done.stderr




@pytest.mark.slow
def test_train_shows_the_pocas_of_a_checkpoint(image_folder, tmp_path):
    run(small_run(image_folder, tmp_path))
    picture = next((image_folder / "val" / "plum").iterdir())
    done = run(small_run(image_folder, tmp_path / "maps", "--resume", tmp_path / "checkpoint.pth.tar",
                         "--show-pocas", picture, "--top-k", 2))
    for kind in ("pocas", "evidence"):  # every head's POCAs; POCA and class evidence side by side
        written = tmp_path / "maps" / f"{kind}_{picture.stem}.png"
        assert f"{picture} -> {written}" in done.stdout and written.read_bytes()[:4] == b"\x89PNG"
    done = run(small_run(image_folder, tmp_path, "--no-use_noah", "--show-pocas", picture, "--resume",
                         tmp_path / "checkpoint.pth.tar"), check=False)
    assert done.returncode == 1 and "holds resnet18 with NOAH" in done.stderr


@pytest.mark.slow
def test_train_shows_the_class_activation_map_of_a_standard_head(image_folder, tmp_path):
    run(small_run(image_folder, tmp_path, "--no-use_noah"))
    picture = next((image_folder / "val" / "plum").iterdir())
    done = run(small_run(image_folder, tmp_path / "maps", "--no-use_noah", "--resume", tmp_path / "checkpoint.pth.tar",
                         "--show-pocas", picture))
    assert (tmp_path / "maps" / f"evidence_{picture.stem}.png").exists()
    assert not (tmp_path / "maps" / f"pocas_{picture.stem}.png").exists()
    run(small_run(image_folder, tmp_path / "deit", "--arch", "deit_tiny_patch16_224", "--no-use_noah"))
    done = run(small_run(image_folder, tmp_path / "deit", "--arch", "deit_tiny_patch16_224", "--no-use_noah",
                         "--resume", tmp_path / "deit" / "checkpoint.pth.tar", "--show-pocas", picture), check=False)
    fails_cleanly(done, "deit_tiny_patch16_224 has no class activation map, as its standard head classifies the class")


# --- bad input: one clear line, a non-zero exit, no traceback, no file lost ---------------------------------------


@pytest.mark.slow
def test_missing_data_folder(tmp_path):
    done = run(small_run(tmp_path / "nowhere", tmp_path / "ck"), check=False)
    fails_cleanly(done, f"error: no folder {tmp_path / 'nowhere' / 'train'}")


@pytest.mark.slow
def test_data_folder_without_class_folders(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    done = run(small_run(tmp_path / "data", tmp_path / "ck"), check=False)
    fails_cleanly(done, "is not laid out as one sub-folder of images per class")


def test_imagenette_loads_from_its_extracted_archive_without_downloading(tmp_path):
    from torchvision import datasets

    for split in ("train", "val"):
        for wnid in datasets.Imagenette._WNID_TO_CLASS:
            folder = tmp_path / "imagenette2-320" / split / wnid
            folder.mkdir(parents=True)
            Image.new("RGB", (48, 40), (10, 200, 30)).save(folder / "a.JPEG")
    args = train.parse_args(["--dataset", "imagenette", "--data", str(tmp_path), "--img-size", "32"])
    train_set, val_set, classes = data.build_datasets(args)
    assert (len(train_set), len(val_set), classes[:3]) == (10, 10, ["tench", "English springer", "cassette player"])
    assert train_set[0][0].shape == val_set[0][0].shape == (3, 32, 32)


def test_cifar_loads_from_its_extracted_archive(monkeypatch, tmp_path):
    import pickle

    from torchvision import datasets

    monkeypatch.setattr(datasets.cifar, "check_integrity", lambda *args: True)  # our files have other checksums
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": torch.randint(0, 256, (4, 3072), dtype=torch.uint8).numpy(), "labels": [0, 1, 2, 9]}
        pickle.dump(batch, open(folder / name, "wb"))
    pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, open(folder / "batches.meta", "wb"))
    args = train.parse_args(["--dataset", "cifar10", "--data", str(tmp_path)])
    train_set, val_set, classes = data.build_datasets(args)
    assert (len(train_set), len(val_set), classes, args.img_size) == (20, 4, [f"class{i}" for i in range(10)], 32)
    assert train_set[0][0].shape == (3, 32, 32)


def test_failed_download_says_where_to_put_the_files(monkeypatch, tmp_path):
    from torchvision import datasets

    def offline(*args, download=False, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(datasets, "CIFAR10", type("CIFAR10", (), {"url": datasets.CIFAR10.url, "base_folder":
                                                                   "cifar-10-batches-py", "__new__": offline}))
    args = train.parse_args(["--dataset", "cifar10", "--data", str(tmp_path)])
    with pytest.raises(train.UserError) as error:
        data.build_datasets(args)
    assert "could not download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in str(error.value)
    assert f"extract it into {tmp_path}, so that {tmp_path}/cifar-10-batches-py exists" in str(error.value)


@pytest.mark.slow
def test_checkpoint_of_another_model(image_folder, one_epoch, tmp_path):
    done = run(small_run(image_folder, tmp_path, "--arch", "mobilenetv2_035", "--resume",
                         one_epoch / "checkpoint.pth.tar", "--evaluate"), check=False)
    fails_cleanly(done, "holds resnet18 with NOAH (N=4, r=0.5), but this run builds mobilenetv2_035 with NOAH")
    bare = tmp_path / "bare.pth"
    torch.save(weights(one_epoch / "checkpoint.pth.tar"), bare)  # a bare state dict says nothing of its model
    done = run(small_run(image_folder, tmp_path, "--no-use_noah", "--resume", bare, "--evaluate"), check=False)
    fails_cleanly(done, "does not fit resnet18 with the standard head: checkpoint does not fit the model: "
                        "missing keys (2): head.fc.weight, head.fc.bias; unexpected keys (4): head.query.weight")


@pytest.mark.slow
def test_unreadable_checkpoint(image_folder, one_epoch, tmp_path):
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes((one_epoch / "checkpoint.pth.tar").read_bytes()[:5000])
    done = run(small_run(image_folder, tmp_path, "--resume", truncated, "--evaluate"), check=False)
    fails_cleanly(done, f"cannot read {truncated} as a checkpoint")


@pytest.mark.slow
def test_global_batch_that_does_not_split_over_the_processes(image_folder, tmp_path):
    done = run(small_run(image_folder, tmp_path, "--train-batch", 7), nproc=2, check=False)
    fails_cleanly(done, "error: --train-batch 7 is the global batch and must split evenly over 2 processes")
    assert not tmp_path.exists() or not os.listdir(tmp_path)


def test_under_torchrun_the_first_process_says_the_error_and_another_only_if_it_was_alone(monkeypatch, capsys):
    waited = []
    monkeypatch.setattr(train.time, "sleep", waited.append)  # not spent here: it is where torchrun ends the others
    error = data.UserError("--flag: wrong")
    for rank, said in (("0", "error: --flag: wrong\n"), ("1", "process 1: error: --flag: wrong\n")):
        monkeypatch.setenv("RANK", rank)
        train.report(error)
        assert capsys.readouterr().err == said
    assert waited == [train.FIRST_PROCESS_GRACE_S]  # the second process, before it spoke
    train.report(train.Interrupted("interrupted; no checkpoint was written yet"))  # Ctrl-C: the first one says it
    assert capsys.readouterr().err == "" and len(waited) == 1


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(image_folder, tmp_path):
    run(small_run(image_folder, tmp_path))
    good = weights(tmp_path / "checkpoint.pth.tar")
    last = tmp_path / "checkpoint.pth.tar"
    resumed = small_run(image_folder, tmp_path, "--epochs", 3, "--lr", 1e38, "--resume", last)
    done = run(resumed, check=False)
    fails_cleanly(done, "at epoch 2, step")
    assert f"the last good checkpoint, {tmp_path / 'checkpoint.pth.tar'}, is kept" in done.stderr
    kept = weights(tmp_path / "checkpoint.pth.tar")
    assert all(torch.equal(good[k], kept[k]) for k in good)
    assert len(read_log(tmp_path)) == 1


@pytest.mark.slow
def test_evaluate_without_a_checkpoint(image_folder, tmp_path):
    fails_cleanly(run(small_run(image_folder, tmp_path, "--evaluate"), check=False), "--evaluate needs --resume PATH")
