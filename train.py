"""Train and evaluate the models of noah.py: one process, or many under torchrun.

    python train.py                                          # quick run: NOAH ResNet18 on synthetic shapes, CPU ok
    python train.py --dataset imagenette --data ./data --arch resnet18 --use_noah --epochs 20
    torchrun --nproc_per_node=8 train.py --preset noah_resnet18 --data ./datasets/ILSVRC2012
    torchrun --nproc_per_node=8 train.py --arch resnet18 --data ./datasets/ILSVRC2012 --use_noah \\
        --head_num 4 --key_ratio 0.5 --evaluate --resume ./checkpoints/noah_resnet18/model_best.pth.tar

The flags are the original repository's (--arch --epochs --lr --wd --lr-decay --schedule --use_noah
--head_num --key_ratio --dropout --nowd-bn --train-batch --data --checkpoint --resume --evaluate ...), so its
commands run unchanged with `torchrun ... train.py` in place of `python -m torch.distributed.launch ...
main.py`. `--preset NAME` fills in a published recipe; flags given on the command line win over it.
Under torchrun the script trains with DistributedDataParallel (NCCL on GPUs, Gloo on CPUs); --train-batch
is the global batch, split evenly over the processes.

Read `main` first: it runs the steps below in the order a run takes them. A resumed run continues exactly:
randomness is reseeded at every epoch from (--manualSeed, epoch, rank), the learning rate is a function of
the epoch, and the checkpoint holds the weights, the optimizer, the grad scaler, the EMA weights and the
arguments.
"""
import argparse
import collections
import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate
from tqdm import tqdm

import noah


class UserError(Exception):
    """A problem with the command line, the data or a file: reported in one line, without a traceback."""


# ------------------------------------------------------------------------------------------------
# 1. Recipes and the command line
# ------------------------------------------------------------------------------------------------

# The original repository's recipes (its README's commands), one per family of noah.MODELS.
RESNET = dict(epochs=100, lr=0.1, wd=1e-4, lr_decay="schedule", schedule=[30, 60, 90], dropout=0.1)
MOBILENETV2 = dict(epochs=150, lr=0.05, wd=4e-5, lr_decay="cos", dropout=0.2)
MOBILENETV3 = dict(MOBILENETV2, nowd_bn=True)
SHUFFLENETV2 = dict(epochs=240, lr=0.5, wd=4e-5, train_batch=1024, lr_decay="linear", dropout=0.0, nowd_bn=True)
# DeiT's recipe (PVT's is the same without EMA): lr 5e-4 per 512 images (here for 8 GPUs x 128 = 1024, and
# scaled so when --train-batch changes it), RandAugment rand-m9-mstd0.5-inc1, float16 autocast throughout,
# and the scheduler stepped after each epoch with that epoch's number (lr_step_lag).
DEIT_LR_PER_512 = 5e-4
DEIT = dict(opt="adamw", opt_eps=1e-8, lr=DEIT_LR_PER_512 * 1024 / 512, wd=0.05, epochs=300, train_batch=1024,
            lr_decay="cos", warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, lr_step_lag=1, nowd_bn=True, smoothing=0.1,
            mixup=0.8, cutmix=1.0, randaug=9, randaug_n=2, randaug_mstd=0.5, train_interpolation="bicubic",
            reprob=0.25, drop_path=0.1, repeated_aug=3, model_ema=True, ema_decay=0.99996, use_amp=True, dropout=0.1)
PVT = dict(DEIT, model_ema=False)
# The MLP models' recipe (the original's mlp/configs/default_noah.yaml; 8 GPUs x 192 = 1536), in float32.
MLP = dict(opt="adamw", opt_eps=1e-6, lr=7e-4, wd=0.067, epochs=300, train_batch=1536, lr_decay="cos",
           warmup_epochs=20, warmup_lr=1e-6, min_lr=1e-5, nowd_bn=True, smoothing=0.1, mixup=0.5, cutmix=1.0,
           randaug=6, randaug_n=3, randaug_mstd=1.0, train_interpolation="random", crop_ratio=[0.67, 1.5],
           reprob=0.0, drop=0.02333, drop_path=0.1, clip_grad=1.0, model_ema=True, ema_decay=0.99992, dropout=0.1)
RECIPES = dict(resnet=RESNET, mobilenetv2=MOBILENETV2, mobilenetv3=MOBILENETV3, shufflenetv2=SHUFFLENETV2,
               deit=DEIT, pvt=PVT, mixer=MLP, gmlp=MLP)


def recipe_for(name):
    family = noah.model_entry(name).family
    if family not in RECIPES:
        raise ValueError(f"model {name} belongs to the family {family!r}, which has no training recipe: "
                         f"add one to train.RECIPES (known: {', '.join(RECIPES)})")
    return RECIPES[family]


def recipe_family(preset):
    return noah.MODELS[PRESETS[preset]["arch"]].family


def make_presets():
    """`noah_<model>` trains a model with NOAH (the paper's N and r), `<model>` the same recipe with the
    standard head. `quick` is the run of `python train.py` with no arguments; `shapes` trains the model
    of the notebooks, whose 4x4 POCA maps (128-pixel images) are fine enough to find the objects."""
    on_shapes = dict(dataset="shapes", use_noah=True, opt="adamw", wd=0.05, nowd_bn=True, lr_decay="cos",
                     train_batch=64, train_size=5000, workers=1, manualSeed=0)
    presets = {"quick": dict(on_shapes, arch="resnet18", img_size=64, epochs=5, lr=1e-3,
                             checkpoint="./checkpoints/quick"),
               "shapes": dict(on_shapes, arch="mobilenetv3_small", img_size=128, epochs=4, lr=3e-3,
                              checkpoint="./checkpoints/shapes")}
    for name in noah.list_models():
        recipe, entry = dict(recipe_for(name), arch=name), noah.MODELS[name]
        presets[f"noah_{name}"] = dict(recipe, use_noah=True, head_num=entry.head_num, key_ratio=entry.key_ratio,
                                       checkpoint=f"./checkpoints/noah_{name}")
        presets[name] = dict(recipe, use_noah=False, checkpoint=f"./checkpoints/{name}")
    return presets


PRESETS = make_presets()


def get_parser():
    p = argparse.ArgumentParser(description="Train or evaluate a model of noah.py.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a published recipe; flags given on the command line win")
    # data (the original's flags first)
    p.add_argument("-d", "--data", help="dataset folder: ImageFolder root with train/ and val/, or where to download")
    p.add_argument("--dataset", choices=["imagenet", "folder", "imagenette", "cifar10", "cifar100", "shapes", "fake"],
                   help="default: imagenet when --data is given, else the quick run's shapes")
    p.add_argument("-j", "--workers", type=int, default=4, help="data loading processes per GPU/process")
    p.add_argument("--img-size", type=int, help="training resolution (default: 224; CIFAR 32; shapes 64)")
    p.add_argument("--crop-pct", type=float, help="evaluation: resize to img-size / crop-pct, then centre crop "
                   "(default: the model's, as the original evaluated it)")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic"], help="resizing (default: the model's)")
    p.add_argument("--train-interpolation", choices=["bilinear", "bicubic", "random"],
                   help="training crops' resizing; random: one of the two per image (default: --interpolation)")
    p.add_argument("--crop-ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], metavar=("LOW", "HIGH"),
                   help="aspect ratios of the random training crops")
    p.add_argument("--normalize", choices=list(noah.MEAN_STD), help="input mean and std: ImageNet's, or 0.5 and "
                   "0.5 (default: the model's; the MLP models use 0.5)")
    p.add_argument("--train-size", type=int, default=2000, help="images per epoch of shapes / fake")
    p.add_argument("--val-size", type=int, default=500, help="validation images of shapes / fake")
    p.add_argument("--max-unreadable", type=float, default=0.01, help="unreadable images are skipped with a warning; "
                   "the run stops when more than this share of an epoch's (or half of a batch's) cannot be read")
    # model
    p.add_argument("-a", "--arch", default="resnet18", choices=noah.list_models(), metavar="ARCH",
                   help="one of: " + ", ".join(noah.list_models()))
    p.add_argument("--use_noah", action=argparse.BooleanOptionalAction, default=False,
                   help="the NOAH head (else the standard head)")
    p.add_argument("--head_num", type=int, help="NOAH heads N (default: the paper's for --arch)")
    p.add_argument("--key_ratio", type=float, help="NOAH key ratio r (default: the paper's for --arch)")
    p.add_argument("--dropout", type=float, default=0.0, help="NOAH's dropout on values (the standard head has none)")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth (ViT and MLP backbones)")
    p.add_argument("--drop", type=float, default=0.0, help="dropout inside ViT and MLP blocks")
    # optimization
    p.add_argument("--epochs", type=int, default=90)
    p.add_argument("--train-batch", type=int, default=256, help="global batch, split over the processes")
    p.add_argument("--test-batch", type=int, default=100, help="per process")
    p.add_argument("--opt", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lr", "--learning-rate", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--opt-eps", type=float, default=1e-8, help="AdamW epsilon")
    p.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=1e-4)
    p.add_argument("--nowd-bn", action="store_true", help="no weight decay on norm weights and biases")
    p.add_argument("--lr-decay", choices=["schedule", "cos", "linear"], default="cos",
                   help="per epoch, as the original")
    p.add_argument("--schedule", type=int, nargs="+", default=[150, 225], help="epochs where 'schedule' decays")
    p.add_argument("--gamma", type=float, default=0.1, help="'schedule' multiplies the lr by this")
    p.add_argument("--warmup-epochs", type=int, default=0, help="linear warmup from --warmup-lr")
    p.add_argument("--lr-step-lag", type=int, default=0, help="epoch e trains at the schedule's value for epoch "
                   "e - lag: DeiT and PVT step their scheduler after each epoch with that epoch's number (lag 1)")
    p.add_argument("--warmup-lr", type=float, default=1e-6)
    p.add_argument("--min-lr", type=float, default=0.0, help="where 'cos' ends")
    p.add_argument("--clip-grad", type=float, help="clip the gradient norm to this")
    p.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    p.add_argument("--mixup", type=float, default=0.0, help="MixUp alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=0.0,
                   help="CutMix alpha (0: off); with MixUp, one of the two per batch")
    p.add_argument("--randaug", type=int, default=0, help="timm's RandAugment: magnitude on its 0-10 scale (0: off)")
    p.add_argument("--randaug-n", type=int, default=2, help="RandAugment operations per image")
    p.add_argument("--randaug-mstd", type=float, default=0.0, help="RandAugment: std of the magnitude's noise")
    p.add_argument("--reprob", type=float, default=0.0, help="RandomErasing probability")
    p.add_argument("--repeated-aug", type=int, default=1, help="DeiT's repeated augmentation: copies per image")
    p.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=False,
                   help="keep an EMA of the weights")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    # speed
    p.add_argument("--use_amp", action="store_true", help="automatic mixed precision")
    p.add_argument("--amp-dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    # checkpoints and evaluation
    p.add_argument("--pretrained-backbone", help="fine-tune from a checkpoint's backbone (torchvision's, the "
                   "original repository's or this project's); its head too where it fits")
    p.add_argument("--backbone-lr-scale", type=float, default=1.0,
                   help="the backbone's lr, as a fraction of the head's")
    p.add_argument("-c", "--checkpoint", default="checkpoints", help="folder for checkpoints, log and curves "
                   "(with --resume: the resumed file's folder, unless given: then the run forks into it)")
    p.add_argument("--resume", default="", help="checkpoint to continue from (or to evaluate); a train.py "
                   "checkpoint brings back its run's flags, those given on the command line win")
    p.add_argument("-e", "--evaluate", action="store_true", help="only evaluate --resume on the validation set")
    p.add_argument("--ema", action="store_true", help="--evaluate / --show-pocas: use the EMA weights of --resume "
                   "(a run with --model-ema), not the trained weights")
    p.add_argument("--manualSeed", type=int, help="random seed (default: drawn at random, saved for --resume)")
    p.add_argument("--show-pocas", nargs="+", metavar="IMAGE", help="draw where --resume's model finds its top "
                   "classes (POCAs and class evidence with NOAH, the class activation map without) on "
                   "these images, into --checkpoint")
    p.add_argument("--top-k", type=int, default=3, help="--show-pocas: the classes to draw per image")
    return p


def parse_args(argv=None):
    """Parse in two passes: the preset (or the quick run) sets defaults, then the command line wins.
    What neither sets comes from the model: its evaluation transform (noah.MODELS)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    preset = args.preset or (None if args.data or args.dataset else "quick")
    if preset:
        parser.set_defaults(**PRESETS[preset])
        args = parser.parse_args(argv)
        args.preset = preset
    if scales_lr_with_batch(preset, explicit_flags(argv)):
        args.lr = DEIT_LR_PER_512 * args.train_batch / 512  # the original scales the lr with the global batch
    args.dataset = args.dataset or "imagenet"
    if args.img_size is None:
        args.img_size = {"cifar10": 32, "cifar100": 32, "shapes": 64}.get(args.dataset, 224)
    entry = noah.MODELS[args.arch]
    args.normalize = args.normalize or entry.normalize
    args.crop_pct = entry.crop_pct if args.crop_pct is None else args.crop_pct
    args.interpolation = args.interpolation or entry.interpolation
    check_numbers(args, parser)
    return args


RANGES = {  # what each number must be, checked at start-up so that a typo fails in a second, not in an hour
    "> 0": (lambda v: v > 0, ["lr", "opt_eps", "gamma", "clip_grad"]),
    ">= 0": (lambda v: v >= 0, ["wd", "workers", "epochs", "warmup_epochs", "warmup_lr", "min_lr", "mixup", "cutmix",
                                "randaug_n", "backbone_lr_scale"]),
    ">= 1": (lambda v: v >= 1, ["train_batch", "test_batch", "img_size", "train_size", "val_size", "repeated_aug",
                                "top_k", "head_num"]),
    "in [0, 1)": (lambda v: 0 <= v < 1, ["momentum", "smoothing", "ema_decay", "dropout", "drop_path", "drop"]),
    "in [0, 1]": (lambda v: 0 <= v <= 1, ["reprob", "max_unreadable"]),
    "in (0, 1]": (lambda v: 0 < v <= 1, ["crop_pct", "key_ratio"]),
    "in [0, 10]": (lambda v: 0 <= v <= 10, ["randaug"]),
}


def scales_lr_with_batch(preset, given):
    """DeiT's and PVT's recipes set the lr from the global batch: when --train-batch is given without --lr."""
    return bool(preset) and recipe_family(preset) in ("deit", "pvt") and "train_batch" in given and "lr" not in given


def check_numbers(args, parser):
    flags = flag_names(parser)
    for valid, (test, names) in RANGES.items():
        for name in names:
            value = getattr(args, name)
            if value is not None and not test(value):
                raise UserError(f"{flags[name]} {value:g}: must be {valid}")


def flag_names(parser):
    """dest -> the flag a user types for it (the first long one): 'train_batch' -> '--train-batch'."""
    return {action.dest: next((o for o in action.option_strings if o.startswith("--")), action.dest)
            for action in parser._actions}


def explicit_flags(argv):
    """The flags given on the command line itself, dest -> value: no default, no preset."""
    parser = get_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


NOT_RESTORED = ("resume", "evaluate", "ema", "show_pocas", "top_k", "pretrained_backbone", "checkpoint")


def restore_arguments(args, argv, checkpoint):
    """--resume of a train.py checkpoint continues the run it saved: its arguments come back, except those
    given on the command line, which win (-> a line for each that changes). It writes beside the resumed
    file, unless --checkpoint names another folder: then the run forks into it, and the original is left as
    it is."""
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) and "config" in checkpoint else None
    if not isinstance(saved, dict):
        return []
    given, flags, overrides = explicit_flags(argv), flag_names(get_parser()), []
    if given.get("preset", saved.get("preset")) != saved.get("preset"):
        recipe = f"--preset {saved['preset']}" if saved.get("preset") else "no preset"
        raise UserError(f"--preset {given['preset']}: {args.resume} continues a run of {recipe}, whose recipe it "
                        f"keeps; give single flags to change it, or start a new run (with --pretrained-backbone "
                        f"{args.resume} to begin from its weights)")
    for key, value in saved.items():
        if key in NOT_RESTORED or not hasattr(args, key):
            continue
        if key not in given:
            setattr(args, key, value)
        elif given[key] != value:
            overrides.append(f"{flags[key]} {given[key]} overrides the resumed run's {value}")
    if scales_lr_with_batch(args.preset, given) and args.train_batch != saved["train_batch"]:
        args.lr = saved["lr"] * args.train_batch / saved["train_batch"]  # as parse_args does for a new run
        overrides.append(f"--lr follows the batch, as the recipe does: {saved['lr']:g} -> {args.lr:g}")
    if "checkpoint" not in given:
        args.checkpoint = os.path.dirname(args.resume) or "."
    return overrides


# ------------------------------------------------------------------------------------------------
# 2. Data
# ------------------------------------------------------------------------------------------------


class Shapes(Dataset):
    """Synthetic images made on the fly, each fixed by (seed, index): one shape, a circle, square,
    triangle, cross, ring or diamond, of random colour, size and place, on a cluttered background
    (smooth greyish noise and random strokes). `sample(i)` also gives the object's bounding box, so
    POCA maps can be checked against where the object really is. No download, any size."""

    classes = ("circle", "square", "triangle", "cross", "ring", "diamond")

    def __init__(self, num_samples=2000, img_size=64, seed=0, transform=None):
        self.num_samples, self.img_size, self.seed, self.transform = num_samples, img_size, seed, transform

    def __len__(self):
        return self.num_samples

    def sample(self, index):
        """-> image (3, S, S) in [0, 1], label, box (x0, y0, x1, y1) in pixels."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        rand = lambda *shape: torch.rand(*shape, generator=g)
        S = self.img_size
        label = index % len(self.classes)
        y, x = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
        # background: colour noise at 4x4, smoothed up to S x S, then strokes of other colours
        noise = 0.5 + 0.3 * (rand(1, 1, 4, 4) - 0.5) + 0.1 * (rand(1, 3, 4, 4) - 0.5)  # greyish, a little colour
        image = F.interpolate(noise, size=(S, S), mode="bilinear", align_corners=False)[0]
        for _ in range(int(rand(1) * 4) + 2):
            (x0, y0, x1, y1), colour = rand(4) * S, rand(3, 1, 1)
            t = (((x - x0) * (x1 - x0) + (y - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2 + 1e-6)).clamp(0, 1)
            stroke = ((x - x0 - t * (x1 - x0)) ** 2 + (y - y0 - t * (y1 - y0)) ** 2) < (S / 64) ** 2
            image = torch.where(stroke, colour, image)
        # the object: its shape in coordinates (u, v) that span [-1, 1] over its box
        radius = S * (0.1 + 0.1 * rand(1))
        cx, cy = radius + rand(2) * (S - 2 * radius)
        u, v = (x - cx) / radius, (y - cy) / radius
        mask = {
            "circle": u ** 2 + v ** 2 <= 1,
            "square": torch.maximum(u.abs(), v.abs()) <= 1,
            "triangle": (v <= 1) & (v >= 2 * u.abs() - 1),
            "cross": ((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1)),
            "ring": ((u ** 2 + v ** 2) <= 1) & ((u ** 2 + v ** 2) >= 0.4),
            "diamond": u.abs() + v.abs() <= 1,
        }[self.classes[label]]
        colour = 0.6 * rand(3, 1, 1)
        colour[int(rand(1) * 3)] = 1.0  # one channel full: a vivid colour on the greyish background
        image = torch.where(mask, colour, image)
        box = torch.cat([cx - radius, cy - radius, cx + radius, cy + radius])
        return image, label, box

    def __getitem__(self, index):
        image, label, _ = self.sample(index)
        return (self.transform(image) if self.transform else image), label


def eval_transform(img_size, crop_pct=0.875, interpolation="bilinear", mean=noah.MEAN_STD["imagenet"][0],
                   std=noah.MEAN_STD["imagenet"][1]):
    """A picture as a model sees it in evaluation: resized to img_size / crop_pct, centre-cropped to
    img_size, normalized. `eval_transform(size, **model.data_config)` prepares it as its model expects."""
    from torchvision.transforms import v2

    resize = v2.Resize(int(img_size / crop_pct), v2.InterpolationMode(interpolation))
    return v2.Compose([resize, v2.CenterCrop(img_size), *to_normalized_tensor(mean, std)])


def to_normalized_tensor(mean, std):
    from torchvision.transforms import v2

    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def build_transforms(args, train):
    """ImageNet-style augmentation for photos (random resized crop, flip, [RandAugment], [RandomErasing]);
    CIFAR's pad-and-crop; a flip for the synthetic sets. To evaluate: `eval_transform` (for the sets other
    than photos, whose images come at the model's size, without the crop margin: that is the identity, and
    any other picture is fitted whole)."""
    from torchvision.transforms import v2

    mean, std = noah.MEAN_STD[args.normalize]
    photos = args.dataset in ("imagenet", "folder", "imagenette")
    if not train:
        return eval_transform(args.img_size, args.crop_pct if photos else 1.0, args.interpolation, mean, std)
    if args.dataset in ("shapes", "fake"):
        return v2.Compose([v2.RandomHorizontalFlip(), *to_normalized_tensor(mean, std)])
    interpolation = args.train_interpolation or args.interpolation
    modes = ["bilinear", "bicubic"] if interpolation == "random" else [interpolation]
    modes = [v2.InterpolationMode(mode) for mode in modes]
    if args.dataset.startswith("cifar"):
        crop = [v2.Resize(args.img_size, modes[0])] * (args.img_size != 32)
        crop += [v2.RandomCrop(args.img_size, padding=args.img_size // 8)]
    else:
        crop = [v2.RandomResizedCrop(args.img_size, ratio=tuple(args.crop_ratio), interpolation=mode) for mode in modes]
        crop = [v2.RandomChoice(crop)] if len(crop) > 1 else crop  # random: bilinear or bicubic, per image
    fill = [round(255 * m) for m in mean]  # timm fills what geometric operations uncover with the mean
    augment = [RandAugment(args.randaug_n, args.randaug, args.randaug_mstd, interpolation, fill)] * bool(args.randaug)
    erase = [v2.RandomErasing(args.reprob, value="random")] if args.reprob else []
    return v2.Compose(crop + [v2.RandomHorizontalFlip()] + augment + to_normalized_tensor(mean, std) + erase)


class RandAugment:
    """timm's RandAugment as DeiT, PVT and the MLP models used it (`rand-m9-mstd0.5-inc1`,
    `rand-m6-n3-mstd1.0-inc1`): for each image, `num_ops` operations drawn (with replacement) from the
    table below, each applied with probability 1/2, at a magnitude drawn from a normal distribution
    N(magnitude, magnitude_std) and clipped to timm's 0-10 scale. The "increasing" variants of timm are
    used: at a higher magnitude every operation changes the image more. Works on PIL images, as timm's (torch
    tensors cannot be rotated bicubically); random numbers come from torch, so a sample's augmentation
    follows its seed.

    At magnitude m (0-10), with "±" a random sign:
        AutoContrast, Equalize, Invert    no argument
        Rotate                            ±30 m/10 degrees
        Posterize                         keep 4 - int(4 m/10) bits (none at m = 10: black)
        Solarize                          invert the pixels >= 256 - int(256 m/10)
        SolarizeAdd                       add int(110 m/10) to the pixels < 128
        Color, Contrast, Brightness,      enhancement factor 1 ± 0.9 m/10
        Sharpness
        ShearX, ShearY                    shear factor ±0.3 m/10 (about the top-left corner, as PIL's)
        TranslateX, TranslateY            ±0.45 m/10 of the width / height
    Geometric operations fill the uncovered pixels with the normalization mean, as timm does.
    """

    def __init__(self, num_ops, magnitude, magnitude_std=0.0, interpolation="bilinear", fill=(124, 116, 104)):
        self.num_ops, self.magnitude, self.magnitude_std = num_ops, magnitude, magnitude_std
        self.interpolation, self.fill = interpolation, list(fill)  # interpolation "random": per operation

    def __call__(self, image):
        for op in torch.randint(len(self.OPS), (self.num_ops,)).tolist():
            if torch.rand(()) < 0.5:
                m = float((self.magnitude + self.magnitude_std * torch.randn(())).clamp(0, 10)) / 10
                try:
                    image = self.apply(self.OPS[op], image, m)
                except Exception as e:  # a bug to fix, not an image to skip: say which operation
                    raise RuntimeError(f"RandAugment's {self.OPS[op]} at magnitude {10 * m:.2f} failed: "
                                       f"{type(e).__name__}: {e}") from e
        return image

    OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
           "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")

    def apply(self, name, image, m):
        """One operation at magnitude m, scaled to [0, 1], on an RGB or grayscale PIL image (other modes,
        such as palette, RGBA or CMYK, are made RGB first: the operations are defined on colours)."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        channels = len(image.getbands())
        fill = self.fill if len(self.fill) == channels else [round(sum(self.fill) / len(self.fill))] * channels
        signed = lambda value: value if torch.rand(()) < 0.5 else -value

        def geometry():  # "random": bilinear or bicubic, drawn for each geometric operation as timm does
            mode = self.interpolation
            if mode == "random":
                mode = "bilinear" if torch.rand(()) < 0.5 else "bicubic"
            return dict(interpolation=InterpolationMode(mode), fill=fill)

        height, width = F.get_size(image)
        if name in ("AutoContrast", "Equalize", "Invert"):
            return {"AutoContrast": F.autocontrast, "Equalize": F.equalize, "Invert": F.invert}[name](image)
        if name == "Rotate":
            return F.rotate(image, signed(30 * m), **geometry())
        if name == "Posterize":  # at m = 1 no bit is kept: a black image, as timm's Pillow gave (today's refuses 0)
            bits = 4 - int(4 * m)
            return F.posterize(image, bits) if bits else Image.new(image.mode, image.size)
        if name == "Solarize":
            threshold = 256 - int(256 * m)
            return F.solarize(image, threshold) if threshold <= 255 else image
        if name == "SolarizeAdd":
            return image.point(lambda value: min(255, value + int(110 * m)) if value < 128 else value)
        if name in ("Color", "Contrast", "Brightness", "Sharpness"):
            enhance = {"Color": F.adjust_saturation, "Contrast": F.adjust_contrast,
                       "Brightness": F.adjust_brightness, "Sharpness": F.adjust_sharpness}[name]
            return enhance(image, 1 + signed(0.9 * m))
        if name in ("ShearX", "ShearY"):
            degrees = math.degrees(math.atan(signed(0.3 * m)))
            shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
            return F.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0], **geometry())
        shift = [signed(0.45 * m) * width, 0] if name == "TranslateX" else [0, signed(0.45 * m) * height]
        return F.affine(image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], **geometry())


def image_folder(root, transform):
    """torchvision's ImageFolder, with a clear error when the folder is missing or holds no classes."""
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(root):
        raise UserError(f"no folder {root}: --data must hold train/ and val/, each with one sub-folder of "
                        f"images per class (for ImageNet, see the README's 'Data' section)")
    try:
        return ImageFolder(root, transform, loader=read_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"{root} is not laid out as one sub-folder of images per class: {e}") from None


def download(make, url, placement):
    """Build a torchvision dataset that downloads itself; say where to put the files if that fails."""
    try:
        return make(download=True)
    except Exception as e:  # network errors come as many types; any of them means the same to the user
        raise UserError(f"could not download {url} ({type(e).__name__}: {e}); download it by hand and "
                        f"{placement}") from None


def build_datasets(args):
    """-> train set, validation set, class names."""
    from torchvision import datasets

    train_tf, val_tf = build_transforms(args, train=True), build_transforms(args, train=False)
    if args.dataset in ("imagenet", "folder"):
        if not args.data:
            raise UserError(f"--dataset {args.dataset} needs --data: a folder with train/ and val/")
        train = image_folder(os.path.join(args.data, "train"), train_tf)
        val = image_folder(os.path.join(args.data, "val"), val_tf)
        if train.classes != val.classes:
            only = lambda a, b: ", ".join(sorted(set(a.classes) - set(b.classes))) or "none"
            raise UserError(f"{args.data}: train/ and val/ must have the same class folders: only in train/: "
                            f"{only(train, val)}; only in val/: {only(val, train)}")
        return train, val, train.classes
    if args.dataset == "shapes":
        train = Shapes(args.train_size, args.img_size, seed=0, transform=train_tf)
        return train, Shapes(args.val_size, args.img_size, seed=1, transform=val_tf), list(Shapes.classes)
    if args.dataset == "fake":
        shape = (3, args.img_size, args.img_size)
        make = lambda size, seed, tf: datasets.FakeData(size, shape, 1000, tf, random_offset=seed)
        return make(args.train_size, 0, train_tf), make(args.val_size, 10 ** 6, val_tf), imagenet_classes()
    root = args.data or "./data"
    if args.dataset == "imagenette":
        return imagenette(root, args.img_size, train_tf, val_tf)
    cifar = datasets.CIFAR10 if args.dataset == "cifar10" else datasets.CIFAR100
    placement = f"extract it into {root}, so that {root}/{cifar.base_folder} exists"
    if os.path.isdir(os.path.join(root, cifar.base_folder)):  # there, yet not accepted: torchvision checked it
        placement = (f"extract it again: {root}/{cifar.base_folder} exists, but its files failed torchvision's "
                     f"checksum (incomplete or damaged)")
    train = download(lambda download: cifar(root, True, train_tf, download=download), cifar.url, placement)
    return train, cifar(root, False, val_tf), train.classes


IMAGENETTE = {"160px": "imagenette2-160", "320px": "imagenette2-320", "full": "imagenette2"}  # size: folder


def imagenette(root, img_size, train_tf, val_tf):
    """Imagenette from whichever size is extracted in `root` (the one --img-size fits best first), else
    downloaded in the smallest size that covers --img-size. -> train set, validation set, class names."""
    from torchvision import datasets

    wanted = "160px" if img_size <= 160 else "320px" if img_size <= 320 else "full"
    preference = (wanted, "full", "320px", "160px")
    extracted = [size for size in preference if os.path.isdir(os.path.join(root, IMAGENETTE[size]))]
    size = extracted[0] if extracted else wanted
    folder = os.path.join(root, IMAGENETTE[size])
    make = lambda split, tf, download=False: datasets.Imagenette(root, split, size, download=download, transform=tf,
                                                                  loader=read_image)
    if extracted:
        check_imagenette(folder, datasets.Imagenette._WNID_TO_CLASS)
        train = make("train", train_tf)
    else:
        placement = f"extract it into {root}, so that {folder}/train/ and val/ exist"
        train = download(lambda download: make("train", train_tf, download), datasets.Imagenette._ARCHIVES[size][0],
                         placement)
    return train, make("val", val_tf), [names[0] for names in train.classes]  # (name, synonyms...)


def check_imagenette(folder, class_folders):
    """An extracted Imagenette must hold train/ and val/, each with its ten class folders."""
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(folder, split)):
            raise UserError(f"{folder} has no {split}/ folder: extract the whole archive, or delete {folder} to "
                            f"download it again")
        missing = [wnid for wnid in class_folders if not os.path.isdir(os.path.join(folder, split, wnid))]
        if missing:
            raise UserError(f"{folder}/{split} has no class folder {', '.join(missing)}: Imagenette has ten, named "
                            f"{', '.join(class_folders)}")


def imagenet_classes():
    """The 1000 ImageNet class names, as torchvision ships them (no download)."""
    from torchvision.models import ResNet50_Weights

    return ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


class RepeatedAugSampler(Sampler):
    """DeiT's repeated augmentation: each chosen image is used `repeats` times in an epoch, spread over the
    processes, each time with its own augmentation. Every process still sees len(dataset) / world images."""

    def __init__(self, dataset, world, rank, repeats, seed):
        self.dataset, self.world, self.rank, self.repeats, self.seed = dataset, world, rank, repeats, seed
        self.epoch = 0
        self.per_process = len(dataset) // world

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        repeated = order.repeat_interleave(self.repeats).tolist()
        return iter(repeated[self.rank::self.world][: self.per_process])

    def __len__(self):
        return self.per_process


def mix_seed(*numbers):
    """One 63-bit seed from several numbers, e.g. (run seed, epoch, rank): a different one for each combination."""
    seed = 0
    for n in numbers:
        seed = (seed * 1_000_003 + n) % 2 ** 63
    return seed


class Unreadable(Exception):
    """An image file that cannot be decoded (corrupt, truncated, empty): skipped with a warning, since one bad
    file among a million should not cost an epoch."""


def read_image(path):
    """The image folders' loader: the picture in RGB, or Unreadable naming the file, so that a file that
    cannot be read is told apart from an augmentation that fails on a readable one."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except OSError as e:  # what PIL raises for a file it cannot decode (UnidentifiedImageError included)
        raise Unreadable(f"{path} ({e})") from None


@dataclass
class Failed:
    """A sample whose augmentation (or any step but reading its file) raised: the run stops with `message`."""

    message: str


class Samples(Dataset):
    """Item (index, seed) of a dataset -> its sample, drawn with torch's random numbers seeded by `seed` in a
    fork of the generator: the augmentation depends on the seed alone (not on which worker loads it), and the
    loading process's own random numbers (MixUp's, with --workers 0) are left as they were. An unreadable
    image becomes None, with a warning naming the file; any other exception becomes Failed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                return self.dataset[index]
            except Unreadable as e:
                print(f"warning: skipped an unreadable image: {e}", file=sys.stderr, flush=True)
                return None
            except Exception as e:  # raised here it would reach the user as a worker's traceback
                samples = getattr(self.dataset, "samples", None)
                where = samples[index][0] if samples else f"item {index} of the {type(self.dataset).__name__} set"
                return Failed(f"{where}: {e if isinstance(e, RuntimeError) else f'{type(e).__name__}: {e}'}; "
                              f"a failing augmentation is a bug to fix, not an image to skip")


def collate_readable(samples):
    """A batch (see build_loaders), or the first Failed sample."""
    failed = [sample for sample in samples if isinstance(sample, Failed)]
    if failed:
        return failed[0]
    readable = [sample for sample in samples if sample is not None]
    images, labels = default_collate(readable) if readable else (None, None)
    return images, labels, len(samples) - len(readable)


def checked(batch):
    """The batch, or the run stopped in one line when one of its samples Failed."""
    if isinstance(batch, Failed):
        raise UserError(batch.message)
    return batch


class SeededSampler(Sampler):
    """Hands out (index, seed) pairs, the seed fixed by (run seed, epoch, rank, position in the epoch)."""

    def __init__(self, sampler, seed, rank):
        self.sampler, self.seed, self.rank, self.epoch = sampler, seed, rank, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        for position, index in enumerate(self.sampler):
            yield index, mix_seed(self.seed, self.epoch, self.rank, position)

    def __len__(self):
        return len(self.sampler)


def build_loaders(args, train_set, val_set, world, rank, pin):
    """Training: shuffled, each process its share, every sample's augmentation seeded (exact resumption,
    whatever the workers). Validation: image i goes to process i % world, so that every image is counted
    exactly once (no padding with repeats), whatever the number of processes. A batch is (images, labels,
    the number of its unreadable images, skipped), images and labels None when none could be read; or the
    Failed sample that must stop the run (`checked` raises it)."""
    if args.repeated_aug > 1:
        sampler = RepeatedAugSampler(train_set, world, rank, args.repeated_aug, args.manualSeed)
    else:
        sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.manualSeed)
    common = dict(num_workers=args.workers, pin_memory=pin, persistent_workers=args.workers > 0,
                  collate_fn=collate_readable)
    # drop_last: a short last batch (one image, at worst) would give BatchNorm a single value per channel
    train = DataLoader(Samples(train_set), args.train_batch // world,
                       sampler=SeededSampler(sampler, args.manualSeed, rank), drop_last=True, **common)
    if len(train) == 0 and not args.evaluate:
        raise UserError(f"the training set has {len(train.sampler)} images per process, fewer than one batch of "
                        f"{args.train_batch // world}: lower --train-batch")
    val_items = [(index, 0) for index in range(rank, len(val_set), world)]  # no randomness: any seed will do
    val = DataLoader(Samples(val_set), args.test_batch, sampler=val_items, **common)
    return train, val


# ------------------------------------------------------------------------------------------------
# 3. Optimization
# ------------------------------------------------------------------------------------------------


def epoch_lr(args, epoch):
    """The learning rate epoch `epoch` trains at: the schedule's, --lr-step-lag epochs late (DeiT, PVT)."""
    return lr_at(args, max(epoch - args.lr_step_lag, 0))


def lr_at(args, epoch):
    """The learning rate of an epoch, as the original sets it once per epoch (plus the warmup and floor
    of the ViT and MLP recipes)."""
    if epoch < args.warmup_epochs:
        return args.warmup_lr + epoch * (args.lr - args.warmup_lr) / args.warmup_epochs
    if args.lr_decay == "schedule":
        return args.lr * args.gamma ** sum(epoch >= s for s in args.schedule)
    if args.lr_decay == "cos":
        return args.min_lr + (args.lr - args.min_lr) * (1 + math.cos(math.pi * epoch / args.epochs)) / 2
    return args.lr * (1 - epoch / args.epochs)  # linear


def param_groups(model, weight_decay, nowd_bn, backbone_lr_scale=1.0):
    """The parameters grouped by weight decay and learning-rate scale. With --nowd-bn, as the original (timm's
    rule): no decay for parameters of one dimension (norms), biases, and those the model names in its
    `no_weight_decay` (DeiT's position embedding and class token, PVT's class token); convolution and linear
    weights, and PVT's position embeddings, decay. The backbone learns at backbone_lr_scale times the head's
    rate (for fine-tuning)."""
    groups, exempt = {}, getattr(model, "no_weight_decay", ())
    for name, p in model.named_parameters():
        decay = not nowd_bn or not (p.ndim <= 1 or name.endswith(".bias") or name in exempt)
        scale = 1.0 if name.startswith("head.") else backbone_lr_scale
        groups.setdefault((decay, scale), []).append(p)
    return [dict(params=params, weight_decay=weight_decay if decay else 0.0, lr_scale=scale)
            for (decay, scale), params in groups.items()]


def build_optimizer(model, args, procs):
    """What a training step updates besides the weights: the optimizer (SGD with momentum or AdamW over
    `param_groups`), the grad scaler of float16 autocast (disabled in other precisions), and the EMA of the
    weights (or None)."""
    groups = param_groups(model, args.wd, args.nowd_bn, args.backbone_lr_scale)
    if args.opt == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, eps=args.opt_eps)
    scaler = torch.amp.GradScaler(procs.device.type, enabled=procs.amp_dtype == torch.float16)
    ema = None
    if args.model_ema:
        average = torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema_decay)
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=average, use_buffers=True)
    return optimizer, scaler, ema


def build_mixup_cutmix(args, num_classes):
    """MixUp and/or CutMix on whole batches (one of the two per batch when both are on), or None."""
    from torchvision.transforms import v2

    chosen = [mix(alpha=alpha, num_classes=num_classes)
              for mix, alpha in ((v2.MixUp, args.mixup), (v2.CutMix, args.cutmix)) if alpha > 0]
    return v2.RandomChoice(chosen) if chosen else None


def reseed(seed, epoch, rank):
    """Fix the random numbers of an epoch on a process (dropout, MixUp) from (seed, epoch, rank): a resumed
    run replays them."""
    random.seed(mix_seed(seed, epoch, rank))
    torch.manual_seed(mix_seed(seed, epoch, rank))


# ------------------------------------------------------------------------------------------------
# 4. Processes, models and checkpoints
# ------------------------------------------------------------------------------------------------


@dataclass
class Processes:
    """Who this process is: the only one, or one of `world` under torchrun, with its device and the precision
    it computes in: `amp_dtype` is None (float32) or the dtype of its autocast."""

    distributed: bool
    world: int
    rank: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype = None

    @property
    def is_main(self):
        return self.rank == 0

    def print(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs)

    @property
    def autocast(self):
        return torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None)

    @property
    def precision(self):
        if self.amp_dtype is None:
            return "float32"
        return f"{str(self.amp_dtype)[6:]} autocast" + " with a grad scaler" * (self.amp_dtype == torch.float16)


FLOAT16_ON_CPU = "NOAH_FLOAT16_ON_CPU"  # =1: float16 autocast on a CPU as on a GPU (slow; tests the GPU's path)


@contextlib.contextmanager
def processes(args):
    """One process, or one per GPU (or CPU slot) under torchrun, which sets RANK and WORLD_SIZE; the process
    group is ended however the run ends. The precision is decided here, for this run on this machine: the
    flags (and so the checkpoints) keep what the user asked for."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if distributed else 1
    rank = int(os.environ["RANK"]) if distributed else 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if distributed else 0
    if torch.cuda.is_available():  # modulo: a scheduler may show each process only its own GPU
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
    if args.train_batch % world and not (args.evaluate or args.show_pocas):
        raise UserError(f"--train-batch {args.train_batch} is the global batch and must split evenly over "
                        f"{world} processes; use a multiple of {world}")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    procs = Processes(distributed, world, rank, local_rank, device)
    if args.use_amp:
        procs.amp_dtype = getattr(torch, args.amp_dtype)
        if device.type == "cpu" and args.amp_dtype == "float16" and os.environ.get(FLOAT16_ON_CPU) != "1":
            procs.amp_dtype = None  # e.g. a DeiT preset on a CPU: float16 autocast is for GPUs
            procs.print("--use_amp: float16 autocast is for GPUs, so this run on the CPU trains in float32 "
                        "(--amp-dtype bfloat16 gives mixed precision on a CPU); a GPU resuming it uses float16")
    try:
        yield procs
    finally:
        if distributed:
            dist.destroy_process_group()


def describe(config):
    head = f"NOAH (N={config['head_num']}, r={config['key_ratio']})" if config["use_noah"] else "the standard head"
    return f"{config['arch']} with {head}"


def build_model(args, num_classes, checkpoint, procs):
    """The model the flags ask for (-> model, its config as checkpoints record it), with the weights of
    --pretrained-backbone and then of --resume, on its device."""
    head_args = dict(head_num=args.head_num, key_ratio=args.key_ratio, dropout=args.dropout) if args.use_noah else {}
    pre_logits = pre_logits_width(checkpoint)
    if pre_logits:
        procs.print(f"{args.resume} has the pre-logits layer of the original narrow DeiTs (to {pre_logits} "
                    f"channels): the model is built with it")
    try:
        model = noah.create_model(args.arch, num_classes, head="noah" if args.use_noah else "gap", **head_args,
                                  img_size=args.img_size, drop_rate=args.drop, drop_path_rate=args.drop_path,
                                  representation_size=pre_logits)
    except ValueError as e:
        raise UserError(str(e)) from None
    config = dict(arch=args.arch, use_noah=args.use_noah, head_num=None, key_ratio=None)
    if args.use_noah:
        config.update(head_num=model.head.head_num, key_ratio=args.key_ratio or noah.MODELS[args.arch].key_ratio)
    if args.pretrained_backbone:
        try:
            head_loaded = noah.load_backbone(model, args.pretrained_backbone)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(f"{args.pretrained_backbone} cannot give {describe(config)} its backbone: {e}") from None
        procs.print(f"backbone loaded from {args.pretrained_backbone}; "
                    + ("its head fits and is loaded too" if head_loaded else "the head starts new"))
    if checkpoint is not None:
        saved = checkpoint.get("config")
        if saved and (saved["arch"], saved["use_noah"]) != (config["arch"], config["use_noah"]):
            raise UserError(f"{args.resume} holds {describe(saved)}, but this run builds {describe(config)}; "
                            f"give the matching --arch and --use_noah / --no-use_noah")
        if args.ema and "ema" not in checkpoint:
            raise UserError(f"--ema: {args.resume} holds no EMA weights (they come from a run with --model-ema)")
        try:
            noah.load_checkpoint(model, checkpoint["ema"] if args.ema else checkpoint)
        except ValueError as e:
            raise UserError(f"{args.resume} does not fit {describe(config)}: {e}") from None
    model.to(procs.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, config


def check_classes(checkpoint, classes, args):
    """A train.py checkpoint names its classes: the data must have the same ones in the same order, else its
    accuracy means nothing."""
    saved = checkpoint.get("classes") if checkpoint is not None else None
    if not saved or list(saved) == list(classes):
        return
    data = args.data or args.dataset
    if sorted(saved) == sorted(classes):
        raise UserError(f"{args.resume} and {data} have the same classes in another order ({', '.join(saved[:3])}, "
                        f"... against {', '.join(classes[:3])}, ...): its outputs would be scored against the "
                        f"wrong labels")
    only = lambda a, b: ", ".join(sorted(set(a) - set(b))[:5]) or "none"
    raise UserError(f"{args.resume} was trained on other classes than {data}'s: only in the checkpoint: "
                    f"{only(saved, classes)}; only in the data: {only(classes, saved)}")


def figure_classes(checkpoint, args):
    """--show-pocas needs no data: the class names are the checkpoint's (train.py's), else --data's, else as
    many as the file's head has: ImageNet's names for 1000, "0" ... "K-1" otherwise."""
    if checkpoint.get("classes"):
        return checkpoint["classes"]
    if args.data:
        return build_datasets(args)[2]
    try:
        state = noah.to_this_layout(noah.read_state_dict(checkpoint), {})
    except ValueError:  # not a checkpoint: build_model's loading says so in its own words
        return imagenet_classes()
    fc, query = state.get("head.fc.weight"), state.get("head.query.weight")
    if fc is not None:
        count = fc.shape[0]
    elif query is not None:  # (N, K, D), or the original's grouped convolution (N*K, D, 1, 1)
        heads = args.head_num or noah.MODELS[args.arch].head_num
        count = query.shape[1] if query.ndim == 3 else query.shape[0] // heads
    else:
        return imagenet_classes()
    return imagenet_classes() if count == 1000 else [str(k) for k in range(count)]


def pre_logits_width(checkpoint):
    """The width of the pre-logits layer that the original narrow DeiTs have, if the checkpoint has one."""
    try:
        state = noah.read_state_dict(checkpoint) if checkpoint is not None else {}
    except ValueError:  # not a checkpoint: load_checkpoint says so in its own words
        return None
    return next((value.shape[0] for key, value in state.items() if key.endswith("pre_logits.fc.weight")), None)


def wrap_model(model, args, procs):
    """What runs the batches: the model itself, compiled (--compile) and/or wrapped for DDP. The
    wrappers share the model's parameters, so the optimizer and checkpoints use `model` directly."""
    net = torch.compile(model) if args.compile else model
    if procs.distributed:
        devices = [procs.local_rank] if procs.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=devices)
    return net


def read_checkpoint_file(path):
    """noah.read_checkpoint (safe: weights only), its errors as one line for the user."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint file {path}")
    try:
        return noah.read_checkpoint(path)
    except ValueError as e:
        raise UserError(str(e)) from None


def restore_run(args, checkpoint, optimizer, scaler, ema, procs):
    """Where a resumed run of train.py stopped: -> first epoch, best top-1, the log so far (read beside the
    resumed file, also when the run forks into another folder). A file of another program only gave its
    weights (in build_model): the run starts at epoch 1."""
    if checkpoint is None:
        return 0, 0.0, []
    if "config" not in checkpoint:
        procs.print(f"{args.resume} was not written by train.py: its weights are loaded, training starts at epoch 1")
        return 0, 0.0, []
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as e:
        raise UserError(f"{args.resume}: its optimizer state does not fit this run ({e})") from None
    if checkpoint.get("scaler") and scaler.is_enabled():  # else a scaler starts anew (float16 added) or is unused
        scaler.load_state_dict(checkpoint["scaler"])
    if ema is not None and "ema" in checkpoint:
        ema.load_state_dict(checkpoint["ema"])
    start_epoch, log_path = checkpoint["epoch"], os.path.join(os.path.dirname(args.resume), "log.jsonl")
    log = []
    if procs.is_main and os.path.exists(log_path):
        log = [r for r in map(json.loads, open(log_path)) if r["epoch"] <= start_epoch]  # drop epochs to be redone
    return start_epoch, float(checkpoint["best_acc"]), log


def save_atomically(state, path):
    """Write to a temporary file beside `path`, then rename: `path` is always a whole file, the old one or
    the new. A failed write removes its partial file and says why, in words (a full disk, a permission)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        full = shutil.disk_usage(os.path.dirname(path) or ".").free < 2 ** 20
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = "the disk is full" if full else getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        raise UserError(f"could not save {path}: {reason}") from None


def save_checkpoint(state, is_best, folder):
    """checkpoint.pth.tar after every epoch, and model_best.pth.tar when the epoch is the best so far."""
    last = os.path.join(folder, "checkpoint.pth.tar")
    kept = "no checkpoint was written"
    if os.path.exists(last):
        kept = f"the last good checkpoint, epoch {state['epoch'] - 1}, is kept"
    try:
        save_atomically(state, last)
        kept = f"{last} holds epoch {state['epoch']}"
        if is_best:
            save_atomically(state, os.path.join(folder, "model_best.pth.tar"))
    except UserError as e:
        raise UserError(f"{e}; {kept}") from None


def prepare_folder(folder):
    """Before any work: make sure the run can write into its folder (a run that cannot save must not train
    for hours first), and remove the partial files of saves that a killed run left behind."""
    try:
        if os.path.isfile(folder):
            raise NotADirectoryError(0, "it is a file")
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"cannot write into {folder} (--checkpoint): {e.strerror}") from None
    for name in os.listdir(folder):
        if re.fullmatch(r"(checkpoint|model_best)\.pth\.tar\.tmp\d+|log\.jsonl\.tmp", name):
            os.remove(os.path.join(folder, name))


def log_epoch(log, record, folder, epochs):
    """Add the epoch's record to log.jsonl (rewritten whole, so that a resumed run drops the epochs it
    redoes) and curves.png, and print it."""
    log.append(record)
    path = os.path.join(folder, "log.jsonl")
    try:
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in log)
        os.replace(path + ".tmp", path)
        plot_curves(log, os.path.join(folder, "curves.png"))
    except OSError as e:
        raise UserError(f"could not write the log in {folder}: {e.strerror}; the checkpoint of epoch "
                        f"{record['epoch']} is saved") from None
    skipped = record["unreadable_train_images"]
    print(f"epoch {record['epoch']}/{epochs}  lr {record['lr']:.4g}  train loss {record['train_loss']:.4f}  "
          f"val loss {record['val_loss']:.4f}  top-1 {record['val_top1']:.2f}%  top-5 {record['val_top5']:.2f}%  "
          f"{record['images_per_s']:.0f} img/s" + (f"  {skipped} unreadable training images skipped" * bool(skipped)),
          flush=True)


def plot_curves(log, path):
    """Loss and top-1 against epochs, from the JSON-lines log, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [r["epoch"] for r in log]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [r["train_loss"] for r in log], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in log], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    if all(r["train_top1"] is not None for r in log):
        ax_acc.plot(epochs, [r["train_top1"] for r in log], label="train")
    ax_acc.plot(epochs, [r["val_top1"] for r in log], label="validation")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="top-1 accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# 5. The run: one epoch of training, evaluation, POCA figures, and main
# ------------------------------------------------------------------------------------------------


def train_one_epoch(net, model, loader, optimizer, scaler, ema, mixup_cutmix, epoch, args, procs):
    """One pass over the training set at the epoch's learning rate -> the epoch's training figures."""
    loader.sampler.set_epoch(epoch)
    batches = iter(loader)  # starting the loader draws random numbers, so reseed after it
    reseed(args.manualSeed, epoch, procs.rank)
    lr = epoch_lr(args, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    net.train()
    started, seen, loss_sum, hits, unreadable = time.time(), 0, 0.0, 0, 0
    epoch_images = len(loader) * loader.batch_size * procs.world
    bar = tqdm(batches, total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
               disable=None if procs.is_main else True)  # None: only on a terminal, not in logs or notebooks
    for step, batch in enumerate(bar):
        images, labels, skipped = checked(batch)
        unreadable = count_unreadable(images, skipped, unreadable, epoch_images, args, procs)
        images, labels = images.to(procs.device, non_blocking=True), labels.to(procs.device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = labels
        if mixup_cutmix is not None:
            images, targets = mixup_cutmix(images, labels)  # soft targets
        with procs.autocast:
            logits = net(images)
            loss = F.cross_entropy(logits, targets, label_smoothing=args.smoothing)
        # averaged over the processes at every step, not just for the log: all must see the same value to stop
        # together on a NaN, rather than some waiting forever for the others in the next all-reduce
        global_loss = sum_over_processes(loss.detach().reshape(1), procs)[0] / procs.world
        stop_if_not_finite(global_loss, f"loss at epoch {epoch + 1}, step {step + 1} of {len(loader)}", args)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update_parameters(model)
        seen, loss_sum = seen + len(images), loss_sum + global_loss * len(images)
        if mixup_cutmix is None:
            hits += (logits.argmax(dim=1) == labels).sum().item()
        bar.set_postfix(loss=f"{global_loss:.3f}", lr=f"{lr:.3g}")
    seconds = time.time() - started
    loss_sum, hits, seen = sum_over_processes([loss_sum, hits, seen], procs)
    return dict(lr=lr, train_loss=loss_sum / seen, train_top1=None if mixup_cutmix else 100 * hits / seen,
                images_per_s=seen / seconds, seconds=seconds,  # train top-1: on augmented images, in train mode
                unreadable_train_images=int(unreadable))


def count_unreadable(images, skipped, so_far, epoch_images, args, procs):
    """The unreadable training images of the epoch so far, this batch's added (over all processes, so that
    all decide alike). Stops the run when more than half of a batch, a whole batch on one process, or more
    than --max-unreadable of the epoch's images could not be read: then the data needs looking at."""
    readable = 0 if images is None else len(images)
    skipped, batch, empty = sum_over_processes([skipped, skipped + readable, images is None], procs)
    if 2 * skipped > batch or empty:
        raise UserError(f"{skipped:.0f} of the {batch:.0f} images of a training batch are unreadable: more than half "
                        f"of a batch; the files are named above")
    if so_far + skipped > args.max_unreadable * epoch_images:
        raise UserError(f"{so_far + skipped:.0f} of the epoch's {epoch_images} training images are unreadable, more "
                        f"than --max-unreadable {args.max_unreadable:g} of them; the files are named above")
    return so_far + skipped


def sum_over_processes(numbers, procs):
    """Sums of a few numbers (a list or a tensor) over all processes, in float64: counts of images stay exact."""
    totals = torch.as_tensor(numbers, dtype=torch.float64, device=procs.device)
    if procs.distributed:
        dist.all_reduce(totals)
    return totals.tolist()


def stop_if_not_finite(loss, where, args):
    """A NaN or infinite loss (training, or validation: its accuracy would be argmax of NaN) stops the run."""
    if not math.isfinite(loss):
        last_path = os.path.join(args.checkpoint, "checkpoint.pth.tar")
        last = "no checkpoint was written yet"
        if os.path.exists(last_path):
            last = f"the last good checkpoint, {last_path}, is kept"
        raise UserError(f"the {where} became {loss}; stopping ({last}). Try a lower --lr or --clip-grad.")


def evaluate(net, loader, procs, progress=True):
    """Top-1, top-5 (%) and the mean loss over the whole validation set, every image counted once (the
    unreadable ones are skipped and counted apart)."""
    net.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=procs.device)  # loss sum, top-1 hits, top-5 hits, images
    unreadable = 0
    with torch.no_grad():
        disable = None if progress and procs.is_main else True  # None: only on a terminal
        for batch in tqdm(loader, desc="  eval", leave=False, disable=disable):
            images, targets, skipped = checked(batch)
            unreadable += skipped
            if images is None:
                continue
            images, targets = images.to(procs.device, non_blocking=True), targets.to(procs.device, non_blocking=True)
            with procs.autocast:
                logits = net(images)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
            totals += torch.stack([F.cross_entropy(logits.float(), targets, reduction="sum"), top5[:, 0].sum(),
                                   top5.any(dim=1).sum(), torch.tensor(len(targets), device=procs.device)]).double()
    loss, top1, top5, n, unreadable = sum_over_processes([*totals.tolist(), unreadable], procs)
    if n == 0:
        raise UserError(f"none of the {unreadable:.0f} validation images could be read (each is named above)")
    return dict(loss=loss / n, top1=100 * top1 / n, top5=100 * top5 / n, images=int(n), unreadable=int(unreadable))


def evaluate_epoch(net, ema, loader, record, epoch, args, procs):
    """Evaluate after a training epoch (and the EMA weights, if any) into the epoch's record -> the result."""
    result = evaluate(net, loader, procs)
    stop_if_not_finite(result["loss"], f"validation loss after epoch {epoch + 1}", args)
    record.update(epoch=epoch + 1, val_loss=result["loss"], val_top1=result["top1"], val_top5=result["top5"],
                  unreadable_val_images=result["unreadable"])
    if ema is not None:
        record["ema_val_top1"] = evaluate(ema, loader, procs, progress=False)["top1"]
    return result


def evaluate_and_report(net, loader, procs):
    """--evaluate: top-1 and top-5 printed as the original prints them, and as a sentence."""
    result = evaluate(net, loader, procs)
    if not math.isfinite(result["loss"]):
        raise UserError(f"the validation loss is {result['loss']}: the model's outputs are not finite, so its "
                        f"accuracy would mean nothing")
    procs.print(f"Test Loss: {result['loss']:.8f}, Test Acc: {result['top1']:.2f}, top-1 {result['top1']:.2f}% "
                f"top-5 {result['top5']:.2f}% on {result['images']} images")
    return result


def write_figures(model, args, classes, device):
    """--show-pocas: for each image, prepared as for evaluation, where the model finds its top classes, into
    --checkpoint: evidence_<image>.png (noah.show_evidence: POCA and class evidence with NOAH, the class
    activation map with the standard head), and with NOAH pocas_<image>.png (every head, noah.show_pocas)."""
    import matplotlib

    matplotlib.use("Agg")
    reason = noah.not_a_sum_over_positions(model)
    if reason:
        raise UserError(f"--show-pocas: {args.arch} has no class activation map, as {reason}; use --use_noah")
    transform, (mean, std) = build_transforms(args, train=False), noah.MEAN_STD[args.normalize]
    paths, stems = [], collections.Counter()
    for image_path in args.show_pocas:
        try:
            image = transform(Image.open(image_path).convert("RGB")).to(device)
        except OSError as e:
            raise UserError(f"cannot read the image {image_path}: {e}") from None
        figures = {"evidence": noah.show_evidence({"NOAH" if args.use_noah else "GAP + FC": model}, image, classes,
                                                  args.top_k, mean, std)}
        if args.use_noah:
            figures["pocas"] = noah.show_pocas(model, image, classes, args.top_k, mean, std)
        stem = os.path.splitext(os.path.basename(image_path))[0]
        stems[stem] += 1  # a/gray.png, b/gray.png -> gray, gray_2
        stem += f"_{stems[stem]}" * (stems[stem] > 1)
        for kind, figure in figures.items():
            paths.append(os.path.join(args.checkpoint, f"{kind}_{stem}.png"))
            figure.savefig(paths[-1], dpi=110)
            print(f"{image_path} -> {paths[-1]}")
    return paths


def choose_seed(args, procs):
    """The run's seed: given, or the resumed run's (restore_arguments brought it back), or drawn by the first
    process and shared, so that all shuffle alike (else their shares of the data overlap); then the initial
    weights are drawn from it (DDP copies rank 0's to the others)."""
    if args.manualSeed is None:
        drawn = random.randint(1, 10000) if procs.is_main else 0
        args.manualSeed = int(sum_over_processes([drawn], procs)[0])
    if procs.distributed:
        print(f"process {procs.rank} of {procs.world}: seed {args.manualSeed}", flush=True)
    torch.manual_seed(args.manualSeed)


class Interrupted(UserError):
    """Ctrl-C during training: said in one line, with where the last checkpoint is."""


@contextlib.contextmanager
def interruptible(folder):
    try:
        yield
    except KeyboardInterrupt:
        last = os.path.join(folder, "checkpoint.pth.tar")
        where = f"the last checkpoint is {last}" if os.path.exists(last) else "no checkpoint was written yet"
        raise Interrupted(f"interrupted; {where}") from None


def finish(args, start_epoch, best_acc, procs):
    if start_epoch >= args.epochs:
        procs.print(f"nothing to train: the run is at epoch {start_epoch} of --epochs {args.epochs}")
    else:
        procs.print(f"best top-1 {best_acc:.2f}%; checkpoints, log.jsonl and curves.png in {args.checkpoint}")


def main(argv=None):
    args = parse_args(argv)
    if (args.evaluate or args.show_pocas) and not args.resume:
        flag = "--evaluate" if args.evaluate else "--show-pocas"
        raise UserError(f"{flag} needs --resume PATH: the checkpoint to use")
    checkpoint = read_checkpoint_file(args.resume) if args.resume else None
    overrides = restore_arguments(args, argv, checkpoint)
    with processes(args) as procs:
        for line in overrides:
            procs.print(line)
        if procs.is_main and not args.evaluate:
            prepare_folder(args.checkpoint)
        choose_seed(args, procs)
        if args.show_pocas:
            classes = figure_classes(checkpoint, args)
        else:
            train_set, val_set, classes = build_datasets(args)
            check_classes(checkpoint, classes, args)
        model, config = build_model(args, len(classes), checkpoint, procs)
        procs.print(f"{describe(config)}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(classes)} "
                    f"classes, {procs.world} process(es) on {procs.device.type}, {procs.precision}")
        if args.show_pocas:
            return write_figures(model, args, classes, procs.device) if procs.is_main else []
        net = wrap_model(model, args, procs)
        train_loader, val_loader = build_loaders(args, train_set, val_set, procs.world, procs.rank,
                                                 pin=procs.device.type == "cuda")
        if args.evaluate:
            return evaluate_and_report(net, val_loader, procs)

        optimizer, scaler, ema = build_optimizer(model, args, procs)
        start_epoch, best_acc, log = restore_run(args, checkpoint, optimizer, scaler, ema, procs)
        del checkpoint  # restored: its weights and optimizer state (a gigabyte for DeiT-B) need not stay in memory
        mixup_cutmix = build_mixup_cutmix(args, len(classes))
        with interruptible(args.checkpoint):
            for epoch in range(start_epoch, args.epochs):
                record = train_one_epoch(net, model, train_loader, optimizer, scaler, ema, mixup_cutmix, epoch, args,
                                         procs)
                result = evaluate_epoch(net, ema, val_loader, record, epoch, args, procs)
                best_acc = max(best_acc, result["top1"])
                if procs.is_main:
                    state = dict(epoch=epoch + 1, arch=args.arch, config=config, classes=classes, acc=result["top1"],
                                 state_dict=model.state_dict(), best_acc=best_acc, optimizer=optimizer.state_dict(),
                                 scaler=scaler.state_dict(), args=vars(args),
                                 **({"ema": ema.state_dict()} if ema else {}))
                    save_checkpoint(state, result["top1"] >= best_acc, args.checkpoint)
                    log_epoch(log, record, args.checkpoint, args.epochs)
        finish(args, start_epoch, best_acc, procs)
    return dict(best_acc=best_acc, log=log)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(e if isinstance(e, Interrupted) else f"error: {e}", file=sys.stderr)
        sys.exit(130 if isinstance(e, Interrupted) else 1)
    except KeyboardInterrupt:  # before training began: nothing was written
        print("interrupted", file=sys.stderr)
        sys.exit(130)
