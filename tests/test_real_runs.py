"""The paths a real run takes, walked whole: every recipe family for an epoch over thousands of images of every
kind, RandAugment at the ends of its ranges, torchrun as a user starts it (no --manualSeed), and float16 AMP
with its grad scaler, run on the CPU as a GPU runs it (NOAH_FLOAT16_ON_CPU=1)."""
import os
import re
import types
from collections import Counter

import pytest
import torch
from PIL import Image

import data
import train
from helpers import fails_cleanly, mixed_image_folder, read_log, run, small_run

FLOAT16 = {train.FLOAT16_ON_CPU: "1"}


@pytest.fixture(scope="session")
def mixed_images(tmp_path_factory):
    """2,000 training and 200 validation images of every kind (see helpers.mixed_image_folder)."""
    return mixed_image_folder(tmp_path_factory.mktemp("mixed"), train_per_class=500, val_per_class=50)


# --- RandAugment at the ends of its ranges ----------------------------------------------------------------------

MODES = ["RGB", "L", "P", "RGBA", "CMYK", "LA", "1", "I", "F", "YCbCr"]
SIZES = [(1, 1), (2, 1), (1, 2), (500, 3), (3, 500), (17, 9)]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "random"])
@pytest.mark.parametrize("name", data.RandAugment.OPS)
def test_every_operation_at_every_magnitude_on_every_mode_and_size(name, interpolation):
    augment = data.RandAugment(2, 9, 0.5, interpolation)
    for mode in MODES:
        for size in SIZES:
            image = Image.new("RGB", size, (200, 90, 30)).convert(mode)
            for magnitude in range(11):
                out = augment.apply(name, image, magnitude / 10)
                assert out.size == size and out.mode in ("RGB", "L"), (mode, size, magnitude)


def is_black(image):
    return all(high == 0 for _, high in image.getextrema())


def test_posterize_at_the_top_of_the_scale_keeps_no_bit_as_timm_did():
    assert is_black(data.RandAugment(1, 10).apply("Posterize", Image.new("RGB", (4, 4), (255, 200, 7)), 1.0))
    assert not is_black(data.RandAugment(1, 10).apply("Posterize", Image.new("RGB", (4, 4), (255, 200, 7)), 0.99))


def test_magnitudes_drawn_past_the_top_of_the_scale_are_clipped_and_applied(monkeypatch):
    """N(10, 1) clipped at 10: half the draws land on 10 itself, where Posterize keeps no bit (below, one bit
    keeps white grey). Each of 3 operations is applied with p 1/2, so an image ends black with p 1 - (3/4)^3."""
    monkeypatch.setattr(data.RandAugment, "OPS", ("Posterize",))
    augment = data.RandAugment(3, 10, magnitude_std=1.0)
    torch.manual_seed(0)
    black = sum(is_black(augment(Image.new("RGB", (3, 3), (255, 255, 255)))) for _ in range(400))
    assert abs(black / 400 - (1 - 0.75 ** 3)) < 0.07  # 0.578; three standard deviations are 0.074


def test_a_failing_augmentation_stops_the_run_naming_the_file_and_the_operation(image_folder, tmp_path, monkeypatch):
    def broken(self, name, image, m):
        raise ValueError("planted")

    monkeypatch.setattr(data.RandAugment, "apply", broken)
    for workers in (0, 2):
        with pytest.raises(train.UserError) as error:
            train.main([str(a) for a in small_run(image_folder, tmp_path, "--randaug", 10, "--randaug-n", 4,
                                                  "--workers", workers)])
        message = str(error.value)
        assert str(image_folder / "train") in message and "RandAugment's" in message, message
        assert "ValueError: planted" in message and "Traceback" not in message and "\n" not in message


# --- every recipe family for an epoch of thousands of images of every kind ----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["noah_deit_tiny_patch16_224", "noah_gmlp_ti16_224", "noah_resnet18"])
def test_a_real_epoch_of_each_recipe_family_over_every_kind_of_image(preset, mixed_images, tmp_path):
    """The family's whole recipe (RandAugment, MixUp/CutMix, erasing, repeated augmentation, EMA, the AMP flag)
    over 2,000 images, with no unreadable image tolerated."""
    done = run(["--preset", preset, "--data", mixed_images, "--img-size", 32, "--train-batch", 64, "--epochs", 1,
                "--max-unreadable", 0, "--workers", 2, "--checkpoint", tmp_path])
    (record,) = read_log(tmp_path)
    assert record["unreadable_train_images"] == 0 and record["unreadable_val_images"] == 0
    assert "warning" not in done.stderr
    expected = 2000 // 64 * 64  # drop_last: every full batch
    assert round(record["images_per_s"] * record["seconds"]) == expected


# --- torchrun as a user starts it ---------------------------------------------------------------------------------

OPEN_LOGGER = """
import builtins, os
_open = builtins.open
def logged_open(file, *args, **kwargs):
    if isinstance(file, str) and file.startswith(os.environ["LOG_UNDER"]):
        with _open(os.path.join(os.environ["LOG_TO"], str(os.getpid())), "a") as log:
            log.write(file + "\\n")
    return _open(file, *args, **kwargs)
builtins.open = logged_open
"""


@pytest.mark.slow
def test_torchrun_without_a_seed_shares_one_and_an_epoch_loads_every_image_once(tmp_path):
    """Seen from outside: which image files each process opens."""
    root = mixed_image_folder(tmp_path / "root", train_per_class=8, val_per_class=2)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(OPEN_LOGGER)
    (tmp_path / "opened").mkdir()
    env = dict(PYTHONPATH=tmp_path / "site", LOG_UNDER=str(root / "train"), LOG_TO=tmp_path / "opened")
    args = small_run(root, tmp_path / "run")
    seed_flag = args.index("--manualSeed")
    del args[seed_flag:seed_flag + 2]
    done = run(args, nproc=2, env=env)
    seeds = re.findall(r"process \d of 2: seed (\d+)", done.stdout)
    assert len(seeds) == 2 and len(set(seeds)) == 1, done.stdout
    per_process = [(tmp_path / "opened" / pid).read_text().split() for pid in os.listdir(tmp_path / "opened")]
    assert len(per_process) == 2
    opened = Counter(path for paths in per_process for path in paths)
    every_image = {str(p) for p in (root / "train").rglob("*.*")}
    assert set(opened) == every_image and set(opened.values()) == {1}
    saved = torch.load(tmp_path / "run" / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert str(saved["args"]["manualSeed"]) in seeds


# --- float16 AMP and its grad scaler, on the CPU as on a GPU -----------------------------------------------------


@pytest.mark.slow
def test_a_deit_run_on_a_cpu_keeps_asking_for_amp_and_resumes_in_float16(image_folder, tmp_path):
    deit = ["--preset", "noah_deit_tiny_patch16_224", "--data", image_folder, "--img-size", 32, "--train-batch", 8,
            "--test-batch", 8, "--workers", 0, "--manualSeed", 1, "--checkpoint", tmp_path, "--epochs", 1]
    first = run(deit)
    chosen = "bfloat16 autocast, channels_last" if train.native_bfloat16() else "float32"  # this CPU's choice
    assert first.stdout.startswith(f"{chosen}: this CPU has") and "a GPU resuming this run uses it" in first.stdout
    saved = torch.load(tmp_path / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert saved["args"]["use_amp"] and saved["args"]["amp_dtype"] == "float16"
    resumed = run(["--resume", tmp_path / "checkpoint.pth.tar", "--epochs", 2], env=FLOAT16)
    assert "float16 autocast with a grad scaler" in resumed.stdout
    assert "Traceback" not in resumed.stderr
    assert torch.load(tmp_path / "checkpoint.pth.tar", map_location="cpu", weights_only=True)["scaler"]["scale"] > 0


@pytest.mark.slow
def test_use_amp_added_on_resume_starts_a_grad_scaler(image_folder, tmp_path):
    run(small_run(image_folder, tmp_path))
    done = run(["--resume", tmp_path / "checkpoint.pth.tar", "--epochs", 2, "--use_amp"], env=FLOAT16)
    assert "--use_amp True overrides the resumed run's False" in done.stdout
    assert "float16 autocast with a grad scaler" in done.stdout and len(read_log(tmp_path)) == 2


@pytest.mark.slow
def test_float16_with_scaling_and_clipping_resumes_exactly(image_folder, tmp_path):
    """The grad scaler's whole path: scaled loss, unscaling before clipping, its state saved and restored."""
    common = ["--arch", "mobilenetv2_035", "--use_amp", "--clip-grad", 0.5, "--dropout", 0.3]
    run(small_run(image_folder, tmp_path / "straight", *common, "--epochs", 2), env=FLOAT16)
    run(small_run(image_folder, tmp_path / "resumed", *common), env=FLOAT16)
    run(small_run(image_folder, tmp_path / "resumed", *common, "--epochs", 2,
                  "--resume", tmp_path / "resumed" / "checkpoint.pth.tar"), env=FLOAT16)
    straight, resumed = (torch.load(tmp_path / run_ / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
                         for run_ in ("straight", "resumed"))
    assert straight["scaler"] == resumed["scaler"] and straight["scaler"]["scale"] < 2.0 ** 16  # steps were skipped
    assert all(torch.equal(straight["state_dict"][k], resumed["state_dict"][k]) for k in straight["state_dict"])


def test_the_precision_is_decided_per_run_and_the_flags_keep_what_was_asked(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "native_bfloat16", lambda: None)  # a CPU without native bfloat16
    for dtype, env, precision in (("float16", None, "float32"), ("float16", "1", "float16 autocast with a grad scaler"),
                                  ("bfloat16", None, "bfloat16 autocast, channels_last")):
        monkeypatch.delenv(train.FLOAT16_ON_CPU, raising=False)
        if env:
            monkeypatch.setenv(train.FLOAT16_ON_CPU, env)
        args = train.parse_args([str(a) for a in small_run(image_folder, tmp_path, "--use_amp", "--amp-dtype", dtype)])
        with train.processes(args) as procs:
            assert procs.precision == precision and args.use_amp and args.amp_dtype == dtype


# --- Imagenette's download, from a server on this machine ----------------------------------------------------------


@pytest.fixture
def imagenette_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving imagenette2-160.tgz in the real archive's layout (imagenette2-160/
    train|val/<wnid>/*.JPEG, 160 px on the short side, plus its CSV of noisy labels), two images per class
    and split; -> the server: its base URL (.url) and the paths it was asked for (.requests)."""
    import functools
    import http.server
    import tarfile
    import threading

    tree = tmp_path / "tree" / "imagenette2-160"
    for split in ("train", "val"):
        for c, wnid in enumerate(data.IMAGENETTE_CLASSES):
            (tree / split / wnid).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (213, 160), (25 * c, 90, 40 * i)).save(tree / split / wnid / f"{wnid}_{i}.JPEG")
    (tree / "noisy_imagenette.csv").write_text("path,noisy_labels_0,is_valid\n")
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "imagenette2-160.tgz", "w:gz") as archive:
        archive.add(tree, arcname="imagenette2-160")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield types.SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", requests=requests)
    server.shutdown()


@pytest.mark.slow
def test_the_imagenette_preset_downloads_extracts_and_trains_from_an_empty_folder(imagenette_server, tmp_path):
    root, env = tmp_path / "data", {data.IMAGENETTE_URL: imagenette_server.url}
    args = ["--preset", "imagenette", "--data", root, "--img-size", 32, "--epochs", 1, "--train-batch", 10,
            "--workers", 0, "--checkpoint", tmp_path / "ck"]
    done = run(args, env=env)
    assert "epoch 1/1" in done.stdout
    assert sorted(p.name for p in root.iterdir()) == ["imagenette2-160"]  # the archive and the partial folder went
    assert len(list((root / "imagenette2-160" / "val").glob("*/*.JPEG"))) == 20
    assert torch.load(tmp_path / "ck" / "checkpoint.pth.tar", weights_only=True)["classes"][0] == "tench"
    again = run(args + ["--resume", tmp_path / "ck" / "checkpoint.pth.tar", "--epochs", 2], env=dict(env, **{
        data.IMAGENETTE_URL: "http://127.0.0.1:9"}))  # extracted: nothing is downloaded again
    assert "epoch 2/2" in again.stdout


@pytest.mark.slow
def test_under_torchrun_one_process_downloads_and_all_train_on_it(imagenette_server, tmp_path):
    """As many requests as one process's download makes (torchvision asks twice: once to follow redirects)."""
    env = {data.IMAGENETTE_URL: imagenette_server.url}
    args = lambda folder: ["--preset", "imagenette", "--data", folder, "--img-size", 32, "--epochs", 1,  # noqa: E731
                           "--train-batch", 10, "--workers", 0, "--checkpoint", tmp_path / "ck"]
    run(args(tmp_path / "alone"), env=env)
    one_download = list(imagenette_server.requests)
    imagenette_server.requests.clear()
    done = run(args(tmp_path / "data"), nproc=2, env=env)
    assert imagenette_server.requests == one_download and set(one_download) == {"/imagenette2-160.tgz"}
    assert "epoch 1/1" in done.stdout and sorted(p.name for p in (tmp_path / "data").iterdir()) == ["imagenette2-160"]


@pytest.mark.slow
def test_under_torchrun_a_failed_download_ends_every_process_with_one_line(tmp_path):
    args = ["--preset", "imagenette", "--data", tmp_path / "data", "--img-size", 32, "--epochs", 1, "--workers", 0,
            "--checkpoint", tmp_path / "ck"]
    done = run(args, nproc=2, check=False, env={data.IMAGENETTE_URL: "http://127.0.0.1:9"})  # nothing answers there
    fails_cleanly(done, "error: could not download http://127.0.0.1:9/imagenette2-160.tgz")
    assert done.stderr.count("error: could not download") == 1  # the first process says it, for all
    assert done.stderr.count("Traceback") == 1 and "ChildFailedError" in done.stderr  # torchrun's own report only


@pytest.mark.slow
def test_a_half_extracted_imagenette_folder_gets_one_line(imagenette_server, tmp_path):
    for split, wnids in (("train", list(data.IMAGENETTE_CLASSES)), ("val", list(data.IMAGENETTE_CLASSES)[:3])):
        for wnid in wnids:  # as tar leaves it when cut: train/ whole, val/ begun
            (tmp_path / "data" / "imagenette2-160" / split / wnid).mkdir(parents=True)
    done = run(["--preset", "imagenette", "--data", tmp_path / "data", "--img-size", 32, "--epochs", 1,
                "--checkpoint", tmp_path / "ck"], check=False, env={data.IMAGENETTE_URL: imagenette_server.url})
    fails_cleanly(done, "imagenette2-160/val has no class folder n03000684, n03028079")
    assert "delete" in done.stderr and "to download it" in done.stderr
