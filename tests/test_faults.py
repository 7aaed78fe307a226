"""train.py under the faults a long run meets: a folder it cannot write, a full disk, a kill during a save,
resuming with fewer flags, unreadable images, odd batches, bad files, bad numbers, Ctrl-C. Each ends with one
line that says what happened, and no work is lost."""
import datetime
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import data
import noah
import train
from helpers import ROOT, build, fails_cleanly, in_original_layout, read_log, run, small_run, weights


def in_mount_namespace(mount, folder, script):
    """Run a shell script in a private mount namespace where `mount` (tmpfs options) is mounted on `folder`;
    skip the test where this machine does not allow it (not root, no unshare)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare to mount a tmpfs in a private namespace")
    folder.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o {mount} tmpfs {folder}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o {mount} tmpfs {folder} && {script}"],
                          capture_output=True, text=True, env=env, timeout=600)


def command(args):
    return " ".join([sys.executable, str(ROOT / "train.py")] + [f"'{a}'" for a in args])


# --- where the run writes -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_read_only_checkpoint_folder_stops_the_run_before_training(image_folder, tmp_path):
    folder = tmp_path / "ro"
    done = in_mount_namespace("ro,size=1m", folder, command(small_run(image_folder, folder)))
    fails_cleanly(done, f"error: cannot write into {folder} (--checkpoint): Read-only file system")
    assert "epoch 1/1" not in done.stdout


@pytest.mark.slow
def test_a_full_disk_says_so_removes_the_partial_file_and_keeps_the_last_checkpoint(image_folder, tmp_path):
    args = ["--arch", "mobilenetv2_035", "--epochs", 2]
    run(small_run(image_folder, tmp_path / "sizes", *args, "--epochs", 1))
    size = (tmp_path / "sizes" / "checkpoint.pth.tar").stat().st_size
    folder = tmp_path / "small"  # room for a checkpoint and the best model, not for a third copy
    script = command(small_run(image_folder, folder, *args)) + f"; echo files: $(ls {folder}); " \
        + f"{sys.executable} -c \"import torch; print('epoch', torch.load('{folder}/checkpoint.pth.tar')['epoch'])\""
    done = in_mount_namespace(f"size={int(2.6 * size)}", folder, script)
    assert "error: could not save" in done.stderr and "the disk is full" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "the last good checkpoint, epoch 1, is kept" in done.stderr
    files = done.stdout.split("files:")[1].split()
    assert not [f for f in files if ".tmp" in f], files
    assert "epoch 1" in done.stdout.splitlines()[-1]


@pytest.mark.slow
def test_a_kill_during_a_save_leaves_no_partial_file_after_resuming_and_the_same_weights(image_folder, tmp_path):
    """SIGKILL in the middle of epoch 2's save: the partial file stays on disk until the resumed run removes
    it, and the resumed run ends with the weights of an uninterrupted one."""
    run(small_run(image_folder, tmp_path / "straight", "--epochs", 2))
    killed = tmp_path / "killed"
    dies_in_second_save = f"""
import os, signal, sys, torch
sys.path.insert(0, {str(ROOT)!r})
import train
saves, save = [], torch.save
def half_a_save(obj, path):
    saves.append(path)
    if len(saves) == 3:  # epoch 1 wrote the checkpoint and the best model; this is epoch 2's checkpoint
        with open(path, "wb") as f:
            f.write(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    save(obj, path)
torch.save = half_a_save
train.main({[str(a) for a in small_run(image_folder, killed, "--epochs", 2)]!r})
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as helpers.run: the same arithmetic as the straight run
    done = subprocess.run([sys.executable, "-c", dies_in_second_save], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == -signal.SIGKILL
    assert [f for f in os.listdir(killed) if ".tmp" in f]  # the partial file a kill leaves behind
    run(small_run(image_folder, killed, "--epochs", 2, "--resume", killed / "checkpoint.pth.tar"))
    assert not [f for f in os.listdir(killed) if ".tmp" in f]
    straight, resumed = weights(tmp_path / "straight" / "checkpoint.pth.tar"), weights(killed / "checkpoint.pth.tar")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
@pytest.mark.parametrize("where, message", [("file", "it is a file"), ("file/run", "Not a directory")])
def test_a_checkpoint_path_that_cannot_be_a_folder(image_folder, tmp_path, where, message):
    (tmp_path / "file").write_text("not a folder")
    done = run(small_run(image_folder, tmp_path / where), check=False)
    fails_cleanly(done, f"error: cannot write into {tmp_path / where} (--checkpoint): {message}")


@pytest.mark.slow
def test_show_pocas_into_a_read_only_folder(image_folder, tmp_path):
    run(small_run(image_folder, tmp_path / "run"))
    picture = next((image_folder / "val" / "plum").iterdir())
    folder = tmp_path / "ro"
    args = small_run(image_folder, folder, "--resume", tmp_path / "run" / "checkpoint.pth.tar", "--show-pocas", picture)
    done = in_mount_namespace("ro,size=1m", folder, command(args))
    fails_cleanly(done, f"error: cannot write into {folder} (--checkpoint): Read-only file system")


# --- resuming -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_alone_continues_with_the_runs_own_flags(image_folder, tmp_path):
    run(small_run(image_folder, tmp_path / "straight", "--epochs", 2))
    run(small_run(image_folder, tmp_path / "resumed"))
    done = run(["--resume", tmp_path / "resumed" / "checkpoint.pth.tar", "--epochs", 2])
    assert "--epochs 2 overrides the resumed run's 1" in done.stdout
    straight, resumed = weights(tmp_path / "straight" / "checkpoint.pth.tar"), weights(
        tmp_path / "resumed" / "checkpoint.pth.tar")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert len(read_log(tmp_path / "resumed")) == 2


@pytest.mark.slow
def test_resume_into_another_folder_forks_the_run_and_leaves_the_original_untouched(image_folder, tmp_path):
    run(small_run(image_folder, tmp_path / "a"))
    before = {f: (tmp_path / "a" / f).read_bytes() for f in os.listdir(tmp_path / "a")}
    run(["--resume", tmp_path / "a" / "checkpoint.pth.tar", "--epochs", 2, "-c", tmp_path / "b"])
    assert {f: (tmp_path / "a" / f).read_bytes() for f in os.listdir(tmp_path / "a")} == before
    assert [r["epoch"] for r in read_log(tmp_path / "b")] == [1, 2]
    assert torch.load(tmp_path / "b" / "checkpoint.pth.tar", weights_only=True)["epoch"] == 2


def test_resumed_arguments_are_restored_and_flags_given_override_them():
    """What describes the run comes back; what describes the machine (train.MACHINE) is this machine's: the
    flags given, else the defaults here."""
    saved = vars(train.parse_args(["--data", "D", "--arch", "resnet50", "--epochs", "3", "--img-size", "32",
                                   "--workers", "7", "--compile", "--no-tf32", "--channels-last"]))
    argv = ["--resume", "run/checkpoint.pth.tar", "--epochs", "5", "--workers", "0"]
    args = train.parse_args(argv)
    overrides = train.restore_arguments(args, argv, {"args": saved, "config": {}})
    assert (args.arch, args.img_size, args.data, args.epochs, args.workers) == ("resnet50", 32, "D", 5, 0)
    assert (args.compile, args.tf32, args.channels_last) == (False, True, None)  # chosen again here
    assert (args.resume, args.checkpoint) == ("run/checkpoint.pth.tar", "run")  # written beside the resumed file
    assert overrides == ["--epochs 5 overrides the resumed run's 3"]


# --- data ---------------------------------------------------------------------------------------------------------


def bad_images(root):
    """A copy of the test images with an unreadable file of each kind in train/ and one in val/."""
    (root / "train" / "apple" / "garbage.jpg").write_bytes(os.urandom(3000))
    good = next((root / "train" / "pear").iterdir()).read_bytes()
    (root / "train" / "pear" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train" / "plum" / "empty.jpg").write_bytes(b"")
    (root / "val" / "plum" / "garbage.jpg").write_bytes(os.urandom(500))
    return root


@pytest.mark.slow
def test_unreadable_images_are_skipped_with_a_warning_naming_each(image_folder, tmp_path):
    root = bad_images(shutil.copytree(image_folder, tmp_path / "root"))
    done = run(small_run(root, tmp_path / "run", "--train-batch", 9, "--workers", 1, "--max-unreadable", 0.2))
    for path in ("train/apple/garbage.jpg", "train/pear/truncated.jpg", "train/plum/empty.jpg", "val/plum/garbage.jpg"):
        assert f"skipped an unreadable image: {root / path}" in done.stderr, done.stderr[-2000:]
    (record,) = read_log(tmp_path / "run")
    assert (record["unreadable_train_images"], record["unreadable_val_images"]) == (3, 1)
    assert "3 unreadable training images skipped" in done.stdout


@pytest.mark.slow
def test_a_batch_of_mostly_unreadable_images_stops_the_run(image_folder, tmp_path):
    root = shutil.copytree(image_folder, tmp_path / "root")
    for path in list((root / "train").rglob("*.jpg"))[:20]:
        path.write_bytes(b"not an image")
    done = run(small_run(root, tmp_path / "run"), check=False)
    fails_cleanly(done, "unreadable: more than half of a batch")


@pytest.mark.slow
def test_a_last_batch_of_one_image_never_reaches_batch_norm(tmp_path):
    done = run(["--dataset", "shapes", "--img-size", 32, "--train-size", 65, "--val-size", 8, "--train-batch", 64,
                "--epochs", 1, "--workers", 0, "--checkpoint", tmp_path])
    assert "epoch 1/1" in done.stdout
    done = run(["--dataset", "shapes", "--img-size", 32, "--train-size", 10, "--train-batch", 16, "--epochs", 1,
                "--workers", 0, "--checkpoint", tmp_path / "tiny"], check=False)
    fails_cleanly(done, "error: the training set has 10 images per process, fewer than one batch of 16")


def imagenette_tree(root, folder="imagenette2-320", splits=("train", "val"), skip_class=None):
    for split in splits:
        for wnid in data.IMAGENETTE_CLASSES:
            if wnid != skip_class:
                (root / folder / split / wnid).mkdir(parents=True)
                Image.new("RGB", (48, 40), (10, 200, 30)).save(root / folder / split / wnid / "a.JPEG")


@pytest.mark.parametrize("folder", ["imagenette2-160", "imagenette2-320", "imagenette2"])
def test_imagenette_of_any_extracted_size_is_found(tmp_path, folder):
    imagenette_tree(tmp_path, folder)
    train_set, val_set, classes = data.build_datasets(train.parse_args(
        ["--dataset", "imagenette", "--data", str(tmp_path), "--img-size", "32"]))
    assert (len(train_set), len(val_set), classes[0]) == (10, 10, "tench")


@pytest.mark.parametrize("tree, message", [
    (dict(skip_class="n01440764"), "imagenette2-320/train has no class folder n01440764"),
    (dict(splits=("train",)), "imagenette2-320 has no val/ folder"),
])
def test_a_bad_imagenette_tree_is_reported_as_a_bad_tree(tmp_path, tree, message):
    imagenette_tree(tmp_path, **tree)
    with pytest.raises(train.UserError, match=message):
        data.build_datasets(train.parse_args(["--dataset", "imagenette", "--data", str(tmp_path), "--img-size", "32"]))


@pytest.mark.parametrize("img_size, size", [(128, "160px"), (224, "320px"), (384, "full")])
def test_img_size_picks_the_imagenette_download(monkeypatch, tmp_path, img_size, size):
    monkeypatch.setenv(data.IMAGENETTE_URL, "http://127.0.0.1:9")  # the discard port: nothing answers there
    args = train.parse_args(["--dataset", "imagenette", "--data", str(tmp_path / "new"), "--img-size", str(img_size)])
    with pytest.raises(train.UserError) as error:
        data.build_datasets(args)
    assert f"could not download http://127.0.0.1:9/{data.IMAGENETTE[size]}.tgz" in str(error.value)
    assert "train/ and val/" in str(error.value)


def test_a_plain_copy_of_imagenette_with_train_and_val_is_read_as_it_is(tmp_path):
    imagenette_tree(tmp_path, folder="copy")
    train_set, val_set, classes = data.build_datasets(train.parse_args(["--preset", "imagenette", "--data",
                                                                        str(tmp_path / "copy")]))
    assert (len(train_set), len(val_set), classes[-1]) == (10, 10, "parachute")


@pytest.mark.parametrize("make, found", [
    (lambda root: (root / "cifar-10-batches-py").mkdir(), "holds cifar-10-batches-py, not Imagenette"),
    (lambda root: imagenette_tree(root, folder="imagenette2-160", splits=("train",)), "imagenette2-160 has no val/"),
    (lambda root: imagenette_tree(root, folder="", skip_class="n03888257"), "train has no class folder n03888257"),
])
def test_a_folder_that_is_not_imagenette_gets_one_line_saying_what_it_holds(tmp_path, make, found):
    make(tmp_path)
    with pytest.raises(train.UserError, match=found):
        data.build_datasets(train.parse_args(["--preset", "imagenette", "--data", str(tmp_path)]))


def test_train_and_val_with_other_class_names_are_named(image_folder, tmp_path):
    root = shutil.copytree(image_folder, tmp_path / "root")
    (root / "val" / "plum").rename(root / "val" / "prune")
    with pytest.raises(train.UserError, match=r"train/ and val/ must have the same class folders: only in "
                                              r"train/: plum; only in val/: prune"):
        data.build_datasets(train.parse_args(["--data", str(root)]))


# --- files that are not checkpoints ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the random bytes start like a pickle
@pytest.mark.parametrize("content, reason", [
    (b"", "the file is empty"),
    ([1, 2, 3], "it holds a list, not a checkpoint (a dict with a state dict)"),
    (torch.zeros(3), "it holds a Tensor, not a checkpoint (a dict with a state dict)"),
    (b"\x80\x04random bytes" + bytes(range(200)), "it is not a PyTorch checkpoint file"),
])
def test_files_that_are_not_checkpoints_get_their_own_reason(tmp_path, content, reason):
    path = tmp_path / "file.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError) as error:
        noah.load_checkpoint(build("resnet18"), path)
    message = str(error.value)
    assert message == f"cannot read {path} as a checkpoint: {reason}", message
    assert "weights_only" not in message and "\x1b[" not in message


def test_a_file_of_other_objects_is_refused_as_unsafe(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "saved_on": datetime.date(2026, 11, 27)}, tmp_path / "objects.pth")
    with pytest.raises(ValueError, match="it holds Python objects other than tensors and plain data, which are "
                                         "refused: loading them could run code"):
        noah.read_checkpoint(tmp_path / "objects.pth")


@pytest.mark.slow
def test_an_empty_file_to_resume_or_to_fine_tune_from(image_folder, tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    for flag in ("--resume", "--pretrained-backbone"):
        done = run(small_run(image_folder, tmp_path / "run", flag, tmp_path / "empty.pth"), check=False)
        fails_cleanly(done, f"cannot read {tmp_path / 'empty.pth'} as a checkpoint: the file is empty")


def test_a_checkpoint_of_other_heads_is_described_as_stored():
    original = in_original_layout(build("resnet18", num_classes=3))  # N=4, as grouped convolutions
    with pytest.raises(ValueError, match=r"seems to be for resnet18 with NOAH \(N=4, r=0.5\), 3 classes"):
        noah.load_checkpoint(noah.create_model("resnet18", num_classes=3, head_num=2), original)


# --- numbers --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, valid", [
    ("--lr", "-1", "> 0"), ("--momentum", "-1", "in [0, 1)"), ("--opt-eps", "-1", "> 0"), ("--workers", "-1", ">= 0"),
    ("--train-batch", "0", ">= 1"), ("--test-batch", "0", ">= 1"), ("--img-size", "0", ">= 1"), ("--wd", "-1", ">= 0"),
    ("--epochs", "-2", ">= 0"), ("--smoothing", "1.5", "in [0, 1)"), ("--reprob", "2", "in [0, 1]"),
    ("--crop-pct", "0", "in (0, 1]"), ("--ema-decay", "1", "in [0, 1)"), ("--repeated-aug", "0", ">= 1"),
    ("--top-k", "0", ">= 1"), ("--train-size", "0", ">= 1"), ("--randaug", "-3", "in [0, 10]"),
])
def test_every_number_is_checked_at_start_up(flag, value, valid):
    with pytest.raises(train.UserError) as error:
        train.parse_args(["--data", "D", flag, value])
    assert str(error.value) == f"{flag} {value}: must be {valid}"


@pytest.mark.slow
def test_a_token_model_at_an_input_smaller_than_it_can_read(tmp_path):
    done = run(["--dataset", "fake", "--arch", "gmlp_ti16_224", "--img-size", 8, "--checkpoint", tmp_path], check=False)
    fails_cleanly(done, "error: img_size=8 must be an integer of at least 32")


def test_zero_epochs_says_there_is_nothing_to_train(image_folder, tmp_path, capsys):
    train.main([str(a) for a in small_run(image_folder, tmp_path, "--epochs", 0)])
    printed = capsys.readouterr().out
    assert "nothing to train: the run is at epoch 0 of --epochs 0" in printed and "curves.png" not in printed
    assert not (tmp_path / "checkpoint.pth.tar").exists()


@pytest.mark.slow
def test_evaluate_under_three_processes_ignores_the_training_batch(image_folder, tmp_path):
    run(small_run(image_folder, tmp_path))
    done = run(small_run(image_folder, tmp_path, "--train-batch", 256, "--evaluate", "--resume",
                         tmp_path / "checkpoint.pth.tar"), nproc=3)
    assert "on 12 images" in done.stdout


def test_ctrl_c_during_a_save_lets_it_finish_then_stops(tmp_path):
    state = {"weights": torch.randn(1000, 100)}

    def write(tmp):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the save begins
        torch.save(state, tmp)
    with pytest.raises(KeyboardInterrupt):
        train.save_atomically(write, str(tmp_path / "checkpoint.pth.tar"))
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]
    assert torch.equal(torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)["weights"], state["weights"])


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_saying_where_the_last_checkpoint_is(tmp_path):
    args = ["--dataset", "shapes", "--img-size", 32, "--train-size", 64, "--val-size", 8, "--train-batch", 16,
            "--epochs", 1000, "--workers", 0, "--checkpoint", tmp_path]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # as from a terminal, where Ctrl-C reaches the run: a suite started in the background (`nohup ... &`) hands its
    # children SIGINT ignored, and Python keeps an ignored SIGINT ignored
    default_ctrl_c = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py")] + [str(a) for a in args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=default_ctrl_c)
    deadline = time.monotonic() + 300
    while not (tmp_path / "log.jsonl").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)  # waits for the first epoch's files, however long it takes (bounded)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and f"interrupted; the last checkpoint is {tmp_path / 'checkpoint.pth.tar'}" in err
