"""What a training step asks of the other processes and of the device, counted on a CPU as a GPU would pay it:
one all-reduce of host numbers per step, a read of the device every train.LOOK_EVERY steps; and the layout the
model receives with --channels-last, after MixUp/CutMix and in evaluation."""
import argparse
import sys

import pytest
import torch
import torch.distributed as dist

import data
import train

STEPS = 2 * train.LOOK_EVERY + 5


def shapes_run(tmp_path, *flags):
    """A run's pieces, in this process, under a one-process Gloo group as torchrun would start it."""
    args = train.parse_args(["--dataset", "shapes", "--img-size", "32", "--train-size", str(2 * STEPS), "--val-size",
                             "10", "--train-batch", "2", "--test-batch", "4", "--workers", "0", "--manualSeed", "0",
                             "--checkpoint", str(tmp_path), *flags])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    procs = train.Processes(True, 1, 0, torch.device("cpu"), memory_format=layout)
    train_set, val_set, classes = data.build_datasets(args)
    model, _ = train.build_model(args, len(classes), None, procs)
    optimizer, scaler, ema = train.build_optimizer(model, args, procs)
    return args, procs, model, (optimizer, scaler, ema), data.build_loaders(args, train_set, val_set, 1, 0, False)


@pytest.mark.slow
def test_a_step_is_one_all_reduce_of_host_numbers_and_reads_the_device_every_few_steps(tmp_path, monkeypatch):
    args, procs, model, updaters, (train_loader, val_loader) = shapes_run(tmp_path)
    shared, reads = [], []  # the buffers all-reduced; the values train.py reads from any other tensor
    all_reduce = dist.all_reduce

    def counted_all_reduce(tensor, *rest, **options):
        shared.append(tensor)
        return all_reduce(tensor, *rest, **options)

    def counted(name):
        read = getattr(torch.Tensor, name)

        def reading(tensor, *rest):
            if sys._getframe(1).f_code.co_filename == train.__file__ and not any(tensor is b for b in shared):
                reads.append(name)
            return read(tensor, *rest)
        return reading

    monkeypatch.setattr(dist, "all_reduce", counted_all_reduce)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    try:
        record = train.train_one_epoch(model, model, train_loader, *updaters, None, 0, args, procs)
        assert len(train_loader) == STEPS and record["train_loss"] > 0
        assert len(shared) == STEPS + 1, len(shared)  # one per step, and the epoch's sums
        assert all(buffer.device.type == "cpu" for buffer in shared)
        assert len(reads) == STEPS // train.LOOK_EVERY + 1, reads  # the loss so far, then the epoch's sums
        shared.clear()
        reads.clear()
        assert train.evaluate(model, val_loader, procs, args.normalize)["images"] == 10
        assert len(shared) == 1 and reads == ["tolist"], reads  # the sums, once
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_channels_last_reaches_the_model_after_mixup_and_in_evaluation(tmp_path):
    args, procs, model, updaters, (train_loader, val_loader) = shapes_run(tmp_path, "--channels-last")
    layouts = []
    model.register_forward_pre_hook(lambda module, inputs: layouts.append(
        inputs[0].is_contiguous(memory_format=torch.channels_last)))
    mixup = data.build_mixup_cutmix(argparse.Namespace(mixup=0.8, cutmix=1.0), 6)

    def mixed_as_on_a_gpu(images, labels):  # on CUDA, MixUp's roll returns the standard layout
        images, targets = mixup(images, labels)
        return images.contiguous(), targets
    try:
        train.train_one_epoch(model, model, train_loader, *updaters, mixed_as_on_a_gpu, 0, args, procs)
        assert len(layouts) == STEPS and all(layouts)
        layouts.clear()
        train.evaluate(model, val_loader, procs, args.normalize)
        assert layouts and all(layouts)
    finally:
        dist.destroy_process_group()
