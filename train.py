"""Train and evaluate the models of noah.py: one process, or many under torchrun.

    python train.py                                          # quick run: NOAH ResNet18 on synthetic shapes, CPU ok
    torchrun --nproc_per_node=8 train.py --preset noah_resnet18 --data ./datasets/ILSVRC2012

The flags are the original repository's, so its commands run unchanged with `torchrun ... train.py` in place of
`python -m torch.distributed.launch ... main.py`; `--preset NAME` fills in a published recipe, and flags given on
the command line win over it. --train-batch is the global batch, split evenly over the processes.

Read `main` first: it runs the steps below in the order a run takes them; data.py makes the batches. A resumed
run continues exactly: randomness is reseeded at every epoch from (--manualSeed, epoch, rank), the learning rate
is a function of the epoch, and the checkpoint holds the weights, optimizer, grad scaler, EMA and arguments.
"""
import argparse
import contextlib
import difflib
import json
import math
import os
import pathlib
import random
import re
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm import tqdm

import data
import noah
from data import UserError

# --- 1. Recipes and the command line -------------------------------------------------------------------------------

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


def make_presets():
    """`noah_<model>` trains a model with NOAH (the paper's N and r), `<model>` the same recipe with the standard
    head. `quick` is the run of `python train.py` with no arguments; `shapes` trains the notebooks' model (4x4 POCA
    maps at 128 pixels, fine enough to find the objects); `imagenette` is the fast check on real photos."""
    small = dict(use_noah=True, opt="adamw", wd=0.05, nowd_bn=True, lr_decay="cos", train_batch=64, manualSeed=0)
    on_shapes = dict(small, dataset="shapes", train_size=5000, workers=1)
    # Imagenette's, from the probes of docs/results.md: the lr moves at every step after one epoch of warmup, the
    # crops keep at least 35% of the photo, and the photos grow from 96 to 128 px (progressive resizing)
    fast_check = dict(lr_per_step=True, warmup_epochs=1, crop_scale=[0.35, 1.0], resize_from=0.75)
    presets = {"quick": dict(on_shapes, arch="resnet18", img_size=64, epochs=5, lr=1e-3,
                             checkpoint="./checkpoints/quick"),
               "shapes": dict(on_shapes, arch="mobilenetv3_small", img_size=128, epochs=4, lr=3e-3,
                              checkpoint="./checkpoints/shapes"),
               "imagenette": dict(small, **fast_check, dataset="imagenette", arch="resnet18", img_size=128, epochs=20,
                                  lr=2e-3, smoothing=0.1, checkpoint="./checkpoints/imagenette")}
    for name, entry in noah.MODELS.items():
        if entry.family not in RECIPES:
            raise ValueError(f"model {name} belongs to the family {entry.family!r}, which has no training recipe: "
                             f"add one to train.RECIPES (known: {', '.join(RECIPES)})")
        recipe = dict(RECIPES[entry.family], arch=name)
        presets[f"noah_{name}"] = dict(recipe, use_noah=True, head_num=entry.head_num, key_ratio=entry.key_ratio,
                                       checkpoint=f"./checkpoints/noah_{name}")
        presets[name] = dict(recipe, use_noah=False, checkpoint=f"./checkpoints/{name}")
    return presets


PRESETS = make_presets()


BOUNDS = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, "in [0, 1)": lambda v: 0 <= v < 1,
          "in [0, 1]": lambda v: 0 <= v <= 1, "in (0, 1]": lambda v: 0 < v <= 1, "in [0, 10]": lambda v: 0 <= v <= 10}


def bounded(kind, bound):
    """An argparse type: a number of `kind` within `bound` (a key of BOUNDS), checked at start-up so that a
    typo fails in a second, not in an hour; argparse names the flag ("--lr -1: must be > 0")."""
    def parse(text):
        value = kind(text)
        if not BOUNDS[bound](value):
            raise argparse.ArgumentTypeError(f"{text}: must be {bound}")
        return value

    parse.__name__ = kind.__name__  # argparse's word for a value that is no number: "invalid int value"
    return parse


def get_parser():
    """The flags; `parser.flags` maps each destination to the flag a user types ('train_batch': '--train-batch').
    The original's flags keep their spelling (--use_noah, --manualSeed), and each has a hyphenated twin."""
    families = [textwrap.fill(", ".join(noah.list_models([family])), 100, initial_indent=f"  {family:<13}",
                              subsequent_indent=" " * 15) for family in RECIPES]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's processes share the cores
    workers = share if torch.cuda.is_available() else share // 2  # on a CPU the other half computes the steps
    p = argparse.ArgumentParser(usage="python train.py [--preset NAME] [--data DIR] [flags]   (or torchrun ... "
                                "train.py ...)", description="Train or evaluate a model of noah.py. The original's "
                                "flags with _ or capitals also take\nhyphens: --use-noah, --head-num, --key-ratio, "
                                "--use-amp, --manual-seed.", epilog="presets (--preset NAME): quick (python train.py's)"
                                ", shapes, imagenette (small runs), and for each model\nbelow, noah_<model> (its "
                                "paper's recipe with NOAH, N and r) and <model> (with the standard head). Models by "
                                "family:\n"
                                + "\n".join(families), exit_on_error=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.flags, groups = {}, [p]

    def add(*names, **options):
        if options.get("default") not in (None, False, "") and "default" not in options.get("help", "default"):
            options["help"] += " (default: %(default)s)"  # only where the default says something
        action = groups[-1].add_argument(*names, **options)
        p.flags[action.dest] = next(name for name in names if name.startswith("--"))
        twins = [re.sub(r"(?<=[a-z])([A-Z])", r"-\1", n).lower().replace("_", "-") for n in names if n[1:2] == "-"]
        if set(twins) - set(names):  # --use-noah for --use_noah, --manual-seed for --manualSeed: not in the help
            groups[-1].add_argument(*twins, **dict(options, dest=action.dest, help=argparse.SUPPRESS))

    add("--preset", choices=sorted(PRESETS), metavar="NAME", help="a published recipe (below); flags given win")
    groups.append(p.add_argument_group("data (the original's flags first)"))
    add("-d", "--data", metavar="DIR", help="dataset folder: train/ and val/ of class folders, or where to download")
    add("--dataset", choices=["imagenet", "folder", "imagenette", "cifar10", "cifar100", "shapes", "fake"],
        help="default: imagenet when --data is given, else the quick run's shapes")
    add("-j", "--workers", type=bounded(int, ">= 0"), default=workers,
        help="loader processes per process: its share of the cores with a GPU, half of it on a CPU, where the "
        "training needs the rest (docs/performance.md, section 5)")
    add("--img-size", type=bounded(int, ">= 1"), help="training resolution (default: 224, CIFAR 32, shapes 64)")
    add("--resize-from", type=bounded(float, "in (0, 1]"), metavar="SHARE", help="progressive resizing: training "
        "begins at this share of --img-size (0.75: 96 px of 128) and grows to it (see training_size); evaluation "
        "stays at --img-size")
    add("--crop-pct", type=bounded(float, "in (0, 1]"), help="evaluation: resize to img-size / crop-pct, centre crop")
    add("--interpolation", choices=["bilinear", "bicubic"], help="resizing (default: the model's)")
    add("--train-interpolation", choices=["bilinear", "bicubic", "random"], help="training crops' resizing")
    add("--crop-ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], metavar=("LOW", "HIGH"),
        help="aspect ratios of the random training crops (default: 3/4 to 4/3)")
    add("--crop-scale", type=float, nargs=2, default=[0.08, 1.0], metavar=("LOW", "HIGH"),
        help="areas of the random training crops, as a share of the photo's (default: 0.08 to 1)")
    add("--normalize", choices=list(noah.MEAN_STD), help="input mean and std (default: the model's)")
    add("--train-size", type=bounded(int, ">= 1"), default=2000, help="shapes / fake images per epoch (quick: 5000)")
    add("--val-size", type=bounded(int, ">= 1"), default=500, help="validation images of shapes / fake")
    add("--max-unreadable", type=bounded(float, "in [0, 1]"), default=0.01, help="the share of an epoch's images "
        "that may be unreadable (skipped with a warning; never more than half a batch)")
    groups.append(p.add_argument_group("model"))
    add("-a", "--arch", default="resnet18", choices=noah.list_models(), metavar="ARCH", help="the model (listed "
        "below)")
    add("--use_noah", action=argparse.BooleanOptionalAction, default=False, help="the NOAH head (else the standard)")
    add("--head_num", type=bounded(int, ">= 1"), help="NOAH heads N (default: the paper's for --arch)")
    add("--key_ratio", type=bounded(float, "in (0, 1]"), help="NOAH key ratio r (default: the paper's for --arch)")
    add("--dropout", type=bounded(float, "in [0, 1)"), default=0.0, help="NOAH's dropout on values")
    add("--head-init", choices=noah.NOAH.INITS, default="scaled", help="NOAH's projections (see noah.NOAH)")
    add("--drop-path", type=bounded(float, "in [0, 1)"), default=0.0, help="stochastic depth (ViT and MLP backbones)")
    add("--drop", type=bounded(float, "in [0, 1)"), default=0.0, help="dropout inside ViT and MLP blocks")
    groups.append(p.add_argument_group("optimization"))
    add("--epochs", type=bounded(int, ">= 0"), default=90, help="epochs to train (in all, when resuming)")
    add("--train-batch", type=bounded(int, ">= 1"), default=256, help="global batch, split over the processes")
    add("--test-batch", type=bounded(int, ">= 1"), default=100, help="per process")
    add("--opt", choices=["sgd", "adamw"], default="sgd", help="the optimizer")
    add("--lr", "--learning-rate", type=bounded(float, "> 0"), default=0.1, help="peak learning rate")
    add("--momentum", type=bounded(float, "in [0, 1)"), default=0.9, help="SGD momentum")
    add("--opt-eps", type=bounded(float, "> 0"), default=1e-8, help="AdamW epsilon")
    add("--wd", "--weight-decay", dest="wd", type=bounded(float, ">= 0"), default=1e-4, help="weight decay")
    add("--nowd-bn", action="store_true", help="no weight decay on norm weights and biases")
    add("--lr-decay", choices=["schedule", "cos", "linear"], default="cos", help="the schedule's shape")
    add("--lr-per-step", action=argparse.BooleanOptionalAction, default=False, help="move the lr (warmup and "
        "decay) at every step; by default once per epoch, as the original")
    add("--schedule", type=int, nargs="+", default=[150, 225], help="epochs where 'schedule' decays")
    add("--gamma", type=bounded(float, "> 0"), default=0.1, help="'schedule' multiplies the lr by this")
    add("--warmup-epochs", type=bounded(int, ">= 0"), default=0, help="linear warmup from --warmup-lr")
    add("--lr-step-lag", type=bounded(int, ">= 0"), default=0, help="epoch e trains at the lr of epoch e - lag")
    add("--warmup-lr", type=bounded(float, ">= 0"), default=1e-6, help="the lr of the warmup's first epoch")
    add("--min-lr", type=bounded(float, ">= 0"), default=0.0, help="where 'cos' ends")
    add("--clip-grad", type=bounded(float, "> 0"), help="clip the gradient norm to this")
    add("--smoothing", type=bounded(float, "in [0, 1)"), default=0.0, help="label smoothing")
    add("--mixup", type=bounded(float, ">= 0"), default=0.0, help="MixUp alpha (0: off)")
    add("--cutmix", type=bounded(float, ">= 0"), default=0.0, help="CutMix alpha (0: off); with MixUp, one per batch")
    add("--randaug", type=bounded(int, "in [0, 10]"), default=0, help="timm's RandAugment: magnitude (0: off)")
    add("--randaug-n", type=bounded(int, ">= 0"), default=2, help="RandAugment operations per image")
    add("--randaug-mstd", type=bounded(float, ">= 0"), default=0.0, help="RandAugment: std of the magnitude's noise")
    add("--reprob", type=bounded(float, "in [0, 1]"), default=0.0, help="RandomErasing probability")
    add("--repeated-aug", type=bounded(int, ">= 1"), default=1, help="DeiT's repeated augmentation: copies per image")
    add("--model-ema", action=argparse.BooleanOptionalAction, default=False, help="keep an EMA of the weights")
    add("--ema-decay", type=bounded(float, "in [0, 1)"), default=0.9999, help="the EMA's weight on its past, per step")
    groups.append(p.add_argument_group("speed"))
    add("--precision", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="auto: on a CPU "
        "with native bfloat16 (AMX or AVX512-BF16), bfloat16 autocast with channels_last, on other CPUs float32 "
        "(there bfloat16 is slow); on a GPU, the recipe's (--use_amp). float16 is for GPUs")
    add("--use_amp", action="store_true", help="the original's flag: autocast in --amp-dtype (on a CPU, float16 "
        "becomes what --precision auto chooses)")
    add("--amp-dtype", choices=["float16", "bfloat16"], default="float16", help="--use_amp's type")
    add("--channels-last", action=argparse.BooleanOptionalAction, help="images and weights in NHWC order (default: "
        "with bfloat16 on a CPU, where it is faster; on a GPU it helps with AMP)")
    add("--tf32", action=argparse.BooleanOptionalAction, default=True, help="CUDA: float32 in TF32 (matmuls, convs)")
    add("--compile", action="store_true", help="torch.compile the model")
    groups.append(p.add_argument_group("checkpoints and evaluation"))
    add("--pretrained-backbone", help="fine-tune from a checkpoint's backbone (and head, where it fits)")
    add("--backbone-lr-scale", type=bounded(float, ">= 0"), default=1.0, help="the backbone's lr / the head's")
    add("-c", "--checkpoint", default="checkpoints", help="folder of the run (with --resume: the file's, unless given)")
    add("--resume", default="", help="checkpoint to continue (with its run's flags) or to evaluate")
    add("-e", "--evaluate", action="store_true", help="only evaluate --resume on the validation set")
    add("--ema", action="store_true", help="--evaluate / --show-pocas: the EMA weights of --resume (--model-ema)")
    add("--manualSeed", type=int, help="random seed (default: drawn at random, saved for --resume)")
    add("--show-pocas", nargs="+", metavar="IMAGE", help="draw where --resume's model finds its top classes")
    add("--log-interval", type=bounded(float, ">= 0"), default=60.0, help="output that is no terminal (a log): "
        "seconds between progress lines, one per 20 steps at most (0: every 20 steps)")
    add("--top-k", type=bounded(int, ">= 1"), default=3, help="--show-pocas: the classes to draw per image")
    return p


def parse(parser, argv):
    """parser.parse_args, its errors in one line ('--lr -1: must be > 0', '--img_size: unknown; did you mean ...?')."""
    try:
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        flag = next((name for name in (e.argument_name or "").split("/") if name.startswith("--")), e.argument_name)
        raise UserError(f"{flag} {e.message}") from None
    if unknown:
        close = difflib.get_close_matches(unknown[0].split("=")[0], parser.flags.values(), n=1, cutoff=0.7)
        raise UserError(f"{unknown[0]}: unknown" + (f"; did you mean {close[0]}?" if close else "; see --help"))
    return args


def parse_args(argv=None):
    """Parse in two passes: the preset (or the quick run) sets defaults, then the command line wins.
    What neither sets comes from the model: its evaluation transform (noah.MODELS)."""
    parser = get_parser()
    args = parse(parser, argv)
    preset = args.preset or (None if args.data or args.dataset else "quick")
    if preset:
        parser.set_defaults(**PRESETS[preset])
        args = parse(parser, argv)
        args.preset = preset
    if scales_lr_with_batch(preset, explicit_flags(argv)):
        args.lr = DEIT_LR_PER_512 * args.train_batch / 512  # the original scales the lr with the global batch
    args.dataset = args.dataset or "imagenet"
    args.img_size = args.img_size or {"cifar10": 32, "cifar100": 32, "shapes": 64}.get(args.dataset, 224)
    entry = noah.MODELS[args.arch]
    args.normalize = args.normalize or entry.normalize
    args.crop_pct = entry.crop_pct if args.crop_pct is None else args.crop_pct
    args.interpolation = args.interpolation or entry.interpolation
    return args


def scales_lr_with_batch(preset, given):
    """DeiT's and PVT's recipes set the lr from the global batch: when --train-batch is given without --lr."""
    family = noah.MODELS[PRESETS[preset]["arch"]].family if preset else None
    return family in ("deit", "pvt") and "train_batch" in given and "lr" not in given


def explicit_flags(argv):
    """The flags given on the command line itself, dest -> value: no default, no preset."""
    parser, unset = get_parser(), object()
    parser.set_defaults(**dict.fromkeys(parser.flags, unset))
    return {dest: value for dest, value in vars(parse(parser, argv)).items() if value is not unset}


NOT_RESTORED = ("resume", "evaluate", "ema", "show_pocas", "top_k", "pretrained_backbone", "checkpoint")
# What describes the machine, not the run: chosen again where a run resumes (defaults, or the flags given there).
# --precision stays with the run: `auto` (the default) chooses again on each machine, a named precision is kept.
MACHINE = ("workers", "compile", "tf32", "channels_last")


def restore_arguments(args, argv, checkpoint):
    """--resume of a train.py checkpoint continues the run it saved: its arguments come back, except those given
    on the command line, which win (-> a line for each that changes). It writes beside the resumed file, unless
    --checkpoint names another folder: then the run forks into it, and the original is left as it is."""
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) and "config" in checkpoint else None
    if not isinstance(saved, dict):
        return []
    given, flags, overrides = explicit_flags(argv), get_parser().flags, []
    applied_preset = args.preset  # the preset parse_args applied, before the saved run's own comes back
    if given.get("preset", saved.get("preset")) != saved.get("preset"):
        recipe = f"--preset {saved['preset']}" if saved.get("preset") else "no preset"
        raise UserError(f"--preset {given['preset']}: {args.resume} continues a run of {recipe}, whose recipe it "
                        f"keeps; give single flags to change it, or start a new run (with --pretrained-backbone "
                        f"{args.resume} to begin from its weights)")
    for key, value in saved.items():
        if key in NOT_RESTORED or key in MACHINE or not hasattr(args, key):
            continue
        if key not in given:
            setattr(args, key, value)
        elif given[key] != value:
            overrides.append(f"{flags[key]} {given[key]} overrides the resumed run's {value}")
    plain = get_parser()  # a preset's flag newer than the checkpoint: the run trained with the flag's default
    for key in PRESETS.get(applied_preset, {}):
        if key not in saved and key not in given and key not in MACHINE:
            setattr(args, key, plain.get_default(key))
    if scales_lr_with_batch(args.preset, given) and args.train_batch != saved["train_batch"]:
        args.lr = saved["lr"] * args.train_batch / saved["train_batch"]  # as parse_args does for a new run
        overrides.append(f"--lr follows the batch, as the recipe does: {saved['lr']:g} -> {args.lr:g}")
    if "checkpoint" not in given:
        args.checkpoint = os.path.dirname(args.resume) or "."
    return overrides


# --- 2. Processes and the model ------------------------------------------------------------------------------------


@dataclass
class Processes:
    """Who this process is (the only one, or one of `world` under torchrun), its device and how it computes: `amp_dtype`
    None (float32, TF32 where `tf32`) or its autocast's; `memory_format` the images'; counts sum over `host_group`."""

    distributed: bool
    world: int
    rank: int
    device: torch.device
    amp_dtype: torch.dtype = None
    tf32: bool = False
    memory_format: torch.memory_format = torch.contiguous_format
    host_group: object = None

    @property
    def is_main(self):
        return self.rank == 0

    def print(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs)

    def autocast(self):
        return torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None)

    @property
    def precision(self):
        """In words: 'bfloat16 autocast, channels_last', 'float32 (TF32 matrix products and convolutions)'."""
        if self.amp_dtype is None:
            words = "float32"
            if self.tf32:
                words += " (TF32 matrix products and convolutions)"
        else:
            words = f"{str(self.amp_dtype).removeprefix('torch.')} autocast"
            if self.amp_dtype == torch.float16:
                words += " with a grad scaler"
        if self.memory_format == torch.channels_last:
            words += ", channels_last"
        return words


FLOAT16_ON_CPU = "NOAH_FLOAT16_ON_CPU"  # =1: float16 autocast on a CPU as on a GPU (slow; tests the GPU's path)


def native_bfloat16():
    """The instructions that make bfloat16 fast on this CPU ('AMX', 'AVX512-BF16'), or None: without them
    PyTorch emulates bfloat16, several times slower than float32."""
    checks = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    for name, check in checks:
        supported = getattr(torch.cpu, check, None)  # private checks of torch.cpu: absent in some releases
        if supported is not None and supported():
            return name
    return None


def choose_precision(args, device):
    """The precision of this run on this machine -> (autocast dtype or None for float32, memory format, why).
    --precision names one; `auto` takes --use_amp's type where it fits the device (the recipe's choice on a GPU),
    else on a CPU bfloat16 if the CPU has it natively, float32 if not. channels_last goes with bfloat16 on a CPU
    unless --channels-last / --no-channels-last say otherwise."""
    on_cpu = device.type == "cpu"
    float16_allowed = not on_cpu or os.environ.get(FLOAT16_ON_CPU) == "1"
    if args.precision != "auto":
        if args.precision == "float16" and not float16_allowed:
            raise UserError("--precision float16: float16 autocast is for GPUs; on a CPU give bfloat16 (fast where "
                            "the CPU has AMX or AVX512-BF16) or float32")
        dtype, why = args.precision, f"--precision {args.precision} asks for it"
    elif args.use_amp and (args.amp_dtype != "float16" or float16_allowed):
        dtype, why = args.amp_dtype, f"--use_amp --amp-dtype {args.amp_dtype} asks for it"
    elif on_cpu:
        found = native_bfloat16()
        if found:
            dtype, why = "bfloat16", f"this CPU has {found} (--precision float32 for float32)"
        else:
            dtype, why = "float32", "this CPU has no native bfloat16 (AMX or AVX512-BF16)"
        if args.use_amp:  # float16, e.g. a DeiT preset: its GPU precision
            why += "; --use_amp's float16 is for GPUs (a GPU resuming this run uses it)"
    else:
        dtype, why = "float32", "on a GPU, the recipe's precision (--use_amp for autocast)"
    channels_last = args.channels_last
    if channels_last is None:
        channels_last = on_cpu and dtype == "bfloat16"
    amp_dtype = None if dtype == "float32" else getattr(torch, dtype)
    return amp_dtype, torch.channels_last if channels_last else torch.contiguous_format, why


@contextlib.contextmanager
def processes(args):
    """One process, or one per GPU (or CPU slot) under torchrun, which sets RANK and WORLD_SIZE; the group is ended
    however the run ends. The precision is decided here, for this run on this machine (choose_precision), and said
    in the run's first line: the flags (and so the checkpoints) keep what the user asked for."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world, rank = (int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])) if distributed else (1, 0)
    device = torch.device("cpu")
    if torch.cuda.is_available():  # modulo: a scheduler may show each process only its own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        # PyTorch of the original's day ran float32 matmuls in TF32 on Ampere and later; today's, convolutions only
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if args.train_batch % world and not (args.evaluate or args.show_pocas):
        raise UserError(f"--train-batch {args.train_batch} is the global batch and must split evenly over "
                        f"{world} processes; use a multiple of {world}")
    amp_dtype, memory_format, why = choose_precision(args, device)
    host_group = None
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        host_group = dist.new_group(backend="gloo") if device.type == "cuda" else None  # counts: no wait for the GPU
    procs = Processes(distributed, world, rank, device, amp_dtype=amp_dtype, tf32=args.tf32 and device.type == "cuda",
                      memory_format=memory_format, host_group=host_group)
    procs.print(f"{procs.precision}: {why}")
    try:
        yield procs
    finally:
        if distributed:
            dist.destroy_process_group()


def choose_seed(args, procs):
    """The run's seed: given, or the resumed run's (restore_arguments brought it back), or drawn by the first process
    and shared, so that all shuffle alike (else their shares overlap); the initial weights are drawn from it."""
    if args.manualSeed is None:
        drawn = random.randint(1, 10000) if procs.is_main else 0
        args.manualSeed = int(sum_over_processes([drawn], procs)[0])
    if procs.distributed:
        # One write, newline included: the processes share the terminal and a line must not be split.
        print(f"process {procs.rank} of {procs.world}: seed {args.manualSeed}\n", end="", flush=True)
    torch.manual_seed(args.manualSeed)


def describe(config):
    head = f"NOAH (N={config['head_num']}, r={config['key_ratio']})" if config["use_noah"] else "the standard head"
    return f"{config['arch']} with {head}"


def build_model(args, num_classes, checkpoint, procs):
    """The model the flags ask for (-> model, its config as checkpoints record it), with the weights of
    --pretrained-backbone and then of --resume (--ema: its EMA weights), on its device."""
    head_args = dict(head_num=args.head_num, key_ratio=args.key_ratio, dropout=args.dropout,
                     head_init=args.head_init) if args.use_noah else {}
    pre_logits = noah.pre_logits_width(checkpoint) if checkpoint is not None else None
    if pre_logits:
        procs.print(f"{args.resume} has the pre-logits layer of the original narrow DeiTs (to {pre_logits} "
                    f"channels): the model is built with it")
    try:
        model = noah.create_model(args.arch, num_classes, head="noah" if args.use_noah else "gap", **head_args,
                                  img_size=args.img_size, drop_rate=args.drop, drop_path_rate=args.drop_path,
                                  representation_size=pre_logits)
    except ValueError as e:
        raise UserError(str(e)) from None
    config = dict(arch=args.arch, use_noah=args.use_noah, head_num=model.head.head_num if args.use_noah else None,
                  key_ratio=(args.key_ratio or noah.MODELS[args.arch].key_ratio) if args.use_noah else None)
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
    return model.to(procs.device, memory_format=procs.memory_format), config


def build_datasets_once(args, procs):
    """data.build_datasets on every process, where the first process of each machine goes first: a download
    (Imagenette, CIFAR into an empty --data) is made once per machine while the others wait, and then all read
    it. If it fails, every process ends with its one line."""
    if not procs.distributed:
        return data.build_datasets(args)
    first_on_machine = int(os.environ.get("LOCAL_RANK", 0)) == 0
    failure = None
    if first_on_machine:
        try:
            built = data.build_datasets(args)
        except UserError as e:
            failure = str(e)
    failures = [None] * procs.world
    dist.all_gather_object(failures, failure, group=procs.host_group)  # the others wait here for the download
    failure = next((f for f in failures if f), None)
    if failure:
        raise UserError(failure)
    if not first_on_machine:
        built = data.build_datasets(args)
    return built


def check_classes(checkpoint, classes, args):
    """A train.py checkpoint names its classes: the data must have the same in the same order, or its
    accuracy means nothing."""
    saved = checkpoint.get("classes") if checkpoint is not None else None
    if not saved or list(saved) == list(classes):
        return
    where = args.data or args.dataset
    if sorted(saved) == sorted(classes):
        raise UserError(f"{args.resume} and {where} have the same classes in another order ({', '.join(saved[:3])}, "
                        f"... against {', '.join(classes[:3])}, ...): its outputs would be scored against the "
                        f"wrong labels")
    raise UserError(f"{args.resume} was trained on other classes than {where}'s: only in the checkpoint: "
                    f"{data.only_in(saved, classes)}; only in the data: {data.only_in(classes, saved)}")


def figure_classes(checkpoint, args):
    """--show-pocas needs no data: the class names are the checkpoint's (train.py's), else --data's, else as
    many as the file's head has: ImageNet's names for 1000 (or if the file says nothing), "0" ... "K-1"."""
    if checkpoint.get("classes"):
        return checkpoint["classes"]
    if args.data:
        return data.build_datasets(args)[2]
    count = noah.stored_num_classes(checkpoint, args.head_num or noah.MODELS[args.arch].head_num)
    return [str(k) for k in range(count)] if count not in (None, 1000) else data.imagenet_classes()


def wrap_model(model, args, procs):
    """What runs the batches: the model itself, compiled (--compile) and/or wrapped for DDP. The
    wrappers share the model's parameters, so the optimizer and checkpoints use `model` directly."""
    net = torch.compile(model) if args.compile else model
    if procs.distributed:
        devices = [procs.device.index] if procs.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=devices)
    return net


# --- 3. The optimizer and the schedule -----------------------------------------------------------------------------


def epoch_lr(args, epoch):
    """The learning rate epoch `epoch` trains at: the schedule's, --lr-step-lag epochs late (DeiT, PVT). With
    --lr-per-step, `epoch` has a fraction: the share of the epoch's steps done."""
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


def training_size(args, epoch):
    """The size epoch `epoch` trains at. With --resize-from, progressive resizing: the size grows from that share
    of --img-size in steps of 16 pixels, linearly over the first three quarters of the run, and the last quarter
    (at least the last epoch) trains at --img-size, the size evaluation sees. Small images early buy time: a step
    costs about the pixels."""
    if args.resize_from is None:
        return args.img_size
    ramp_epochs = 0.75 * args.epochs
    if epoch >= min(ramp_epochs, args.epochs - 1):
        return args.img_size
    start = round(args.resize_from * args.img_size)
    grown = (args.img_size - start) * epoch / ramp_epochs
    return start + 16 * int(grown // 16)


def size_schedule(args):
    """Progressive resizing in words: 'epochs 1-8 at 96 px, epochs 9-15 at 112 px, epochs 16-20 at 128 px'."""
    spans = []  # [first epoch, last epoch, size], 1-based
    for epoch in range(args.epochs):
        size = training_size(args, epoch)
        if spans and spans[-1][2] == size:
            spans[-1][1] = epoch + 1
        else:
            spans.append([epoch + 1, epoch + 1, size])
    words = [f"epoch {first}" if first == last else f"epochs {first}-{last}" for first, last, _ in spans]
    return ", ".join(f"{epochs} at {size} px" for epochs, (_, _, size) in zip(words, spans))


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
    optimizer = (torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum) if args.opt == "sgd" else
                 torch.optim.AdamW(groups, lr=args.lr, eps=args.opt_eps))
    scaler = torch.amp.GradScaler(procs.device.type, enabled=procs.amp_dtype == torch.float16)
    average = torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema_decay)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=average, use_buffers=True) if args.model_ema else None
    return optimizer, scaler, ema


# --- 4. Checkpoints, the log and figures ---------------------------------------------------------------------------


def read_checkpoint_file(path):
    """noah.read_checkpoint (safe: weights only), its errors as one line for the user."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint file {path}")
    try:
        return noah.read_checkpoint(path)
    except ValueError as e:
        raise UserError(str(e)) from None


def restore_run(args, checkpoint, model, optimizer, scaler, ema, procs):
    """Where a resumed run of train.py stopped: -> first epoch, best top-1, the log so far (read beside the resumed
    file, also when the run forks). A file of another program only gave its weights: the run starts at epoch 1."""
    if checkpoint is None:
        return 0, 0.0, []
    if "config" not in checkpoint:
        procs.print(f"{args.resume} was not written by train.py: its weights are loaded, training starts at epoch 1")
        return 0, 0.0, []
    restore_optimizer(optimizer, checkpoint, model, args, procs)
    if checkpoint.get("scaler") and scaler.is_enabled():  # else a scaler starts anew (float16 added) or is unused
        scaler.load_state_dict(checkpoint["scaler"])
    if ema is not None and "ema" in checkpoint:
        ema.load_state_dict(checkpoint["ema"])
    start_epoch, log_path = checkpoint["epoch"], os.path.join(os.path.dirname(args.resume), "log.jsonl")
    best_acc = float(checkpoint["best_acc"])
    log = []
    if procs.is_main and os.path.exists(log_path):
        log = [r for r in map(json.loads, open(log_path)) if r["epoch"] <= start_epoch]  # drop epochs to be redone
    procs.print(f"resuming after epoch {start_epoch} of {args.epochs} (best top-1 {best_acc:.2f}%)")
    trained_in = checkpoint.get("precision")
    if trained_in and trained_in != procs.precision:  # another machine, or --precision given: a study should know
        procs.print(f"epoch {start_epoch}, the checkpoint's last, ran in {trained_in}; "
                    f"the run continues in {procs.precision}")
    return start_epoch, best_acc, log


def restore_optimizer(optimizer, checkpoint, model, args, procs):
    """The resumed run's optimizer state (SGD's momentum, AdamW's moments) under this run's hyperparameters: each
    parameter's state follows it into the groups that the flags make now, so that a --wd, --momentum, --opt-eps,
    --backbone-lr-scale or --nowd-bn given on resuming acts from the first step. Another --opt starts the state
    anew (SGD's momentum means nothing to AdamW), and says so."""
    saved_args = checkpoint.get("args") or {}
    if saved_args.get("opt", args.opt) != args.opt:
        procs.print(f"--opt {args.opt}: the resumed run used {saved_args['opt']}, whose state {args.opt} cannot use; "
                    f"the optimizer's state starts anew")
        return
    saved = checkpoint["optimizer"]
    nowd_bn = saved_args.get("nowd_bn", args.nowd_bn)
    scale = saved_args.get("backbone_lr_scale", args.backbone_lr_scale)
    saved_order = [p for group in param_groups(model, 0.0, nowd_bn, scale) for p in group["params"]]  # its indices
    now = optimizer.state_dict()
    index_now = {p: i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    saved_count = sum(len(group["params"]) for group in saved["param_groups"])
    if saved_count != len(saved_order) or not set(saved["state"]) <= set(range(saved_count)):
        raise UserError(f"{args.resume}: its optimizer state holds {saved_count} parameters, this model "
                        f"{len(saved_order)}: it does not fit this run")
    state = {index_now[saved_order[i]]: value for i, value in saved["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": now["param_groups"]})


@contextlib.contextmanager
def ctrl_c_held():
    """Ctrl-C during the block takes effect at its end, so that a file being saved is finished first (cut in
    the middle, torch.save would report the interrupt as a broken zip file)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread receives signals
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            raise KeyboardInterrupt


def save_atomically(write, path):
    """write(tmp) to a temporary file beside `path`, then rename it: `path` is always a whole file, the old one
    or the new. A failed write removes its partial file and says why, in words (a full disk, a permission)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with ctrl_c_held():  # around the clean-up too: a Ctrl-C during a failed write still removes the partial file
        try:
            write(tmp)
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
    kept = f"the last good checkpoint, epoch {state['epoch'] - 1}, is kept" if os.path.exists(last) else \
        "no checkpoint was written"
    try:
        paths = [last]
        if is_best:
            paths.append(os.path.join(folder, "model_best.pth.tar"))
        for path in paths:
            save_atomically(lambda tmp: torch.save(state, tmp), path)
            kept = f"{last} holds epoch {state['epoch']}"
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
        if re.fullmatch(r"(checkpoint\.pth\.tar|model_best\.pth\.tar|log\.jsonl|curves\.png)\.tmp\d+", name):
            os.remove(os.path.join(folder, name))


def log_epoch(log, record, folder, epochs):
    """Add the epoch's record to log.jsonl (rewritten whole, so that a resumed run drops the epochs it
    redoes) and curves.png, and print it."""
    log.append(record)
    lines = "".join(json.dumps(r) + "\n" for r in log)
    try:
        save_atomically(lambda tmp: pathlib.Path(tmp).write_text(lines), os.path.join(folder, "log.jsonl"))
        save_atomically(lambda tmp: plot_curves(log, tmp), os.path.join(folder, "curves.png"))
    except UserError as e:
        raise UserError(f"{e}; the checkpoint of epoch {record['epoch']} is saved") from None
    line = (f"epoch {record['epoch']}/{epochs}  lr {record['lr']:.4g}  train loss {record['train_loss']:.4f}  val loss "
            f"{record['val_loss']:.4f}  top-1 {record['val_top1']:.2f}%  top-5 {record['val_top5']:.2f}%  "
            f"{record['images_per_s']:.0f} img/s")
    if record["unreadable_train_images"]:
        line += f"  {record['unreadable_train_images']} unreadable training images skipped"
    print(line, flush=True)


def plot_curves(log, path):
    """Loss and top-1 against epochs, from the JSON-lines log, as a PNG (a bare Figure: no pyplot, no backend)."""
    axes = Figure(figsize=(10, 3.8), layout="tight").subplots(1, 2)
    epochs = [r["epoch"] for r in log]
    for ax, metric, title in zip(axes, ("loss", "top1"), ("loss", "top-1 accuracy (%)")):
        if all(r[f"train_{metric}"] is not None for r in log):  # no train top-1 with MixUp's mixed targets
            ax.plot(epochs, [r[f"train_{metric}"] for r in log], marker="o", label="train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in log], marker="o", label="validation")
        ax.set(xlabel="epoch", title=title, xlim=(epochs[0] - 0.5, epochs[-1] + 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].figure.savefig(path, dpi=100, format="png")


def write_figures(model, args, classes):
    """--show-pocas: for each image, prepared as for evaluation, where the model finds its top classes, as PNGs in
    --checkpoint: evidence_<image>.png (noah.show_evidence: POCA and class evidence with NOAH, the CAM with a
    standard head) and, with NOAH, pocas_<image>.png (every head: noah.show_pocas). -> the figures' paths."""
    import matplotlib.pyplot as plt  # slow to import, and only --show-pocas needs it

    reason = noah.not_a_sum_over_positions(model)
    if reason:
        raise UserError(f"--show-pocas: {args.arch} has no class activation map, as {reason}; use --use_noah")
    transform = data.build_transforms(args, train=False)
    mean, std = noah.MEAN_STD[args.normalize]
    with_noah = isinstance(model.head, noah.NOAH)
    device = next(model.parameters()).device
    written, stems = [], {}
    for image_path in args.show_pocas:
        try:
            image = transform(data.read_image(image_path)).to(device)
        except data.Unreadable as e:
            raise UserError(f"cannot read the image {e}") from None
        figures = {"evidence": noah.show_evidence({"NOAH" if with_noah else "GAP + FC": model}, image, classes,
                                                  args.top_k, mean, std)}
        if with_noah:
            figures["pocas"] = noah.show_pocas(model, image, classes, args.top_k, mean, std)
        stem = pathlib.Path(image_path).stem
        stems[stem] = stems.get(stem, 0) + 1
        if stems[stem] > 1:  # a/gray.png, b/gray.png -> gray, gray_2
            stem = f"{stem}_{stems[stem]}"
        for kind, figure in figures.items():
            path = os.path.join(args.checkpoint, f"{kind}_{stem}.png")
            figure.savefig(path, dpi=110)
            plt.close(figure)  # pyplot would keep every figure of a long list of images in memory
            print(f"{image_path} -> {path}")
            written.append(path)
    return written


# --- 5. The run: one epoch of training, evaluation, and main -------------------------------------------------------

LOOK_EVERY = 20  # steps between two reads of the training loss from the device: the NaN check, the progress bar


def train_one_epoch(net, model, loader, optimizer, scaler, ema, mixup_cutmix, epoch, args, procs):
    """One pass over the training set at the epoch's learning rate -> the epoch's training figures. A step is one
    all-reduce of host numbers; every LOOK_EVERY steps it reads the loss from the device (a NaN stops all)."""
    loader.sampler.set_epoch(epoch)
    batches = iter(loader)  # starting the loader draws random numbers, so reseed after it
    reseed(args.manualSeed, epoch, procs.rank)
    lr = set_learning_rate(optimizer, epoch_lr(args, epoch))
    size = training_size(args, epoch)
    net.train()
    started = last_line = time.time()
    seen = unreadable = looked = 0  # images (of all processes), unreadable ones; looked: the step the loss was read
    sums = torch.zeros(2, dtype=torch.float64, device=procs.device)  # loss x images, top-1 hits (moot with MixUp)
    epoch_images, steps = len(loader) * loader.batch_size * procs.world, len(loader)
    bar = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
               disable=None if procs.is_main else True)  # None: only on a terminal, not in logs or notebooks
    for step, batch in enumerate(bar):
        images, labels, skipped = checked(batch)
        look = step - looked == LOOK_EVERY  # then read the loss so far: the step's one wait for the device
        shared = [skipped, 0 if images is None else len(images), images is None, sums[0].item() if look else 0.0]
        skipped, readable, empty, loss_sum = sum_over_processes(shared, procs)
        unreadable = count_unreadable(skipped, skipped + readable, empty, unreadable, epoch_images, args)
        if look:
            stop_if_not_finite(loss_sum, f"loss at epoch {epoch + 1}, steps {looked + 1} to {step} of {steps}", args)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{lr:.3g}")
            if procs.is_main and not sys.stdout.isatty() and time.time() - last_line >= args.log_interval:
                last_line = progress_line(epoch, step, steps, seen, loss_sum, lr, started, args)  # a log: no bar
            looked = step
        seen += readable
        if args.lr_per_step:
            lr = set_learning_rate(optimizer, epoch_lr(args, epoch + step / steps))
        images, labels, targets = batch_on_device(images, labels, size, mixup_cutmix, args, procs)
        with procs.autocast():
            logits = net(images)
            loss = F.cross_entropy(logits, targets, label_smoothing=args.smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)  # skipped when float16 overflowed: the scaler then lowers its scale
        scaler.update()
        if ema is not None:
            ema.update_parameters(model)
        sums += torch.stack([loss.detach() * len(images), (logits.argmax(dim=1) == labels).sum()])
    loss_sum, hits = sum_over_processes(sums.tolist(), procs)
    stop_if_not_finite(loss_sum, f"loss at epoch {epoch + 1}, steps {looked + 1} to {steps} of {steps}", args)
    seconds = time.time() - started  # train top-1: on augmented images, in train mode
    return dict(lr=lr, img_size=size, train_loss=loss_sum / seen,
                train_top1=None if mixup_cutmix else 100 * hits / seen, images_per_s=seen / seconds, seconds=seconds,
                unreadable_train_images=int(unreadable))


def batch_on_device(images, labels, size, mixup_cutmix, args, procs):
    """A loader's batch as the model trains on it -> images, labels, targets: normalized on the device, made
    `size` pixels wide (progressive resizing), mixed by MixUp / CutMix (soft targets), in the run's memory format."""
    images = data.normalize_batch(images.to(procs.device, non_blocking=True), args.normalize)
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    labels = labels.to(procs.device, non_blocking=True)
    targets = labels
    if mixup_cutmix is not None:
        images, targets = mixup_cutmix(images, labels)
    images = images.contiguous(memory_format=procs.memory_format)  # after MixUp: on a GPU its roll drops it
    return images, labels, targets


def set_learning_rate(optimizer, lr):
    """The epoch's lr into each parameter group, times its lr_scale (--backbone-lr-scale) -> lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return lr


def progress_line(epoch, step, steps, seen, loss_sum, lr, started, args):
    """Print the epoch's progress as a line, for a log where tqdm's bar is off -> when."""
    now = time.time()
    left = round((now - started) * (steps - step) / step)  # whole seconds, so that 59.7 s reads 1:00, not 0:60
    print(f"  epoch {epoch + 1}/{args.epochs}  step {step}/{steps}  {seen / (now - started):.0f} img/s  loss "
          f"{loss_sum / seen:.4f}  lr {lr:.4g}  ETA {left // 60}:{left % 60:02d}", flush=True)
    return now


def reseed(seed, epoch, rank):
    """Fix the random numbers of an epoch on a process (dropout, MixUp) from (seed, epoch, rank): a resumed
    run replays them."""
    random.seed(data.mix_seed(seed, epoch, rank))
    torch.manual_seed(data.mix_seed(seed, epoch, rank))


def checked(batch):
    """A batch (images, labels, unreadable count; see data.build_loaders), or the run stopped in one line when
    one of its samples failed."""
    if isinstance(batch, data.Failed):
        raise UserError(str(batch))
    return batch


def count_unreadable(skipped, batch, empty, so_far, epoch_images, args):
    """The unreadable training images of the epoch so far, this batch's added (counts of all processes, so that
    all decide alike). Stops the run when more than half of a batch, a whole batch on one process, or more
    than --max-unreadable of the epoch's images could not be read: then the data needs looking at."""
    if 2 * skipped > batch or empty:
        raise UserError(f"{skipped:.0f} of the {batch:.0f} images of a training batch are unreadable: more than half "
                        f"of a batch; the files are named above")
    if so_far + skipped > args.max_unreadable * epoch_images:
        raise UserError(f"{so_far + skipped:.0f} of the epoch's {epoch_images} training images are unreadable, more "
                        f"than --max-unreadable {args.max_unreadable:g} of them; the files are named above")
    return so_far + skipped


def sum_over_processes(numbers, procs):
    """Sums of a few host numbers over all processes, in float64 (counts of images stay exact), on the host: a
    GPU's queue of work goes on meanwhile."""
    if not procs.distributed:
        return [float(n) for n in numbers]
    totals = torch.tensor(numbers, dtype=torch.float64)
    dist.all_reduce(totals, group=procs.host_group)
    return totals.tolist()


def stop_if_not_finite(loss, where, args):
    """A NaN or infinite loss (training, or validation: its accuracy would be argmax of NaN) stops the run."""
    if not math.isfinite(loss):
        last = os.path.join(args.checkpoint, "checkpoint.pth.tar")
        last = f"the last good checkpoint, {last}, is kept" if os.path.exists(last) else "no checkpoint was written yet"
        raise UserError(f"the {where} became {loss}; stopping ({last}). Try a lower --lr or --clip-grad.")


def evaluate(net, loader, procs, normalize, progress=True):
    """Top-1, top-5 (%) and the mean loss over the whole validation set, every image counted once (the
    unreadable ones are skipped and counted apart). normalize: the name of the inputs' mean and std."""
    net.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=procs.device)  # loss sum, top-1 hits, top-5 hits
    images_seen, unreadable = 0, 0
    with torch.no_grad():
        disable = None if progress and procs.is_main else True  # None: only on a terminal
        for batch in tqdm(loader, desc="  eval", leave=False, disable=disable):
            images, targets, skipped = checked(batch)
            unreadable, images_seen = unreadable + skipped, images_seen + (0 if images is None else len(images))
            if images is None:
                continue
            images = data.normalize_batch(images.to(procs.device, non_blocking=True), normalize)
            images = images.contiguous(memory_format=procs.memory_format)
            targets = targets.to(procs.device, non_blocking=True)
            with procs.autocast():
                logits = net(images)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
            totals += torch.stack([F.cross_entropy(logits.float(), targets, reduction="sum"), top5[:, 0].sum(),
                                   top5.any(dim=1).sum()]).double()
    loss, top1, top5, n, unreadable = sum_over_processes([*totals.tolist(), images_seen, unreadable], procs)
    if n == 0:
        raise UserError(f"none of the {unreadable:.0f} validation images could be read (each is named above)")
    return dict(loss=loss / n, top1=100 * top1 / n, top5=100 * top5 / n, images=int(n), unreadable=int(unreadable))


def evaluate_epoch(net, ema, loader, record, epoch, args, procs):
    """Evaluate after a training epoch (and the EMA weights, if any) into the epoch's record -> the result."""
    result = evaluate(net, loader, procs, args.normalize)
    stop_if_not_finite(result["loss"], f"validation loss after epoch {epoch + 1}", args)
    record.update(epoch=epoch + 1, val_loss=result["loss"], val_top1=result["top1"], val_top5=result["top5"],
                  unreadable_val_images=result["unreadable"])
    if ema is not None:
        record["ema_val_top1"] = evaluate(ema, loader, procs, args.normalize, progress=False)["top1"]
    return result


def evaluate_and_report(net, loader, procs, normalize):
    """--evaluate: top-1 and top-5 printed as the original prints them, and as a sentence."""
    result = evaluate(net, loader, procs, normalize)
    if not math.isfinite(result["loss"]):
        raise UserError(f"the validation loss is {result['loss']}: the model's outputs are not finite (so no accuracy)")
    procs.print(f"Test Loss: {result['loss']:.8f}, Test Acc: {result['top1']:.2f}, top-1 {result['top1']:.2f}% "
                f"top-5 {result['top5']:.2f}% on {result['images']} images")
    return result


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


def main(argv=None):
    args = parse_args(argv)
    if (args.evaluate or args.show_pocas) and not args.resume:
        raise UserError(f"{'--evaluate' if args.evaluate else '--show-pocas'} needs --resume PATH: the checkpoint")
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
            train_set, val_set, classes = build_datasets_once(args, procs)
            check_classes(checkpoint, classes, args)
        model, config = build_model(args, len(classes), checkpoint, procs)
        procs.print(f"{describe(config)}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(classes)} "
                    f"classes, {procs.world} process(es) on {procs.device.type}")
        if args.show_pocas:
            return write_figures(model, args, classes) if procs.is_main else []
        net = wrap_model(model, args, procs)
        train_loader, val_loader = data.build_loaders(args, train_set, val_set, procs.world, procs.rank,
                                                      pin=procs.device.type == "cuda")
        if args.evaluate:
            return evaluate_and_report(net, val_loader, procs, args.normalize)
        optimizer, scaler, ema = build_optimizer(model, args, procs)
        start_epoch, best_acc, log = restore_run(args, checkpoint, model, optimizer, scaler, ema, procs)
        del checkpoint  # restored: its weights and optimizer state (a gigabyte for DeiT-B) need not stay in memory
        mixup_cutmix = data.build_mixup_cutmix(args, len(classes))
        if args.resize_from is not None:
            procs.print(f"progressive resizing: {size_schedule(args)}")
        with interruptible(args.checkpoint):
            for epoch in range(start_epoch, args.epochs):
                record = train_one_epoch(net, model, train_loader, optimizer, scaler, ema, mixup_cutmix, epoch, args,
                                         procs)
                result = evaluate_epoch(net, ema, val_loader, record, epoch, args, procs)
                best_acc = max(best_acc, result["top1"])
                if procs.is_main:
                    state = dict(epoch=epoch + 1, arch=args.arch, config=config, classes=classes, acc=result["top1"],
                                 state_dict=model.state_dict(), best_acc=best_acc, optimizer=optimizer.state_dict(),
                                 scaler=scaler.state_dict(), args=vars(args), precision=procs.precision,
                                 **({"ema": ema.state_dict()} if ema else {}))
                    save_checkpoint(state, result["top1"] >= best_acc, args.checkpoint)
                    log_epoch(log, record, args.checkpoint, args.epochs)
        done = start_epoch >= args.epochs
        procs.print(f"nothing to train: the run is at epoch {start_epoch} of --epochs {args.epochs}" if done else
                    f"best top-1 {best_acc:.2f}%; checkpoints, log.jsonl and curves.png in {args.checkpoint}")
    return dict(best_acc=best_acc, log=log)


FIRST_PROCESS_GRACE_S = 20  # seconds; torchrun looks at its processes every 0.1 s by default (--monitor-interval)


def report(error):
    """The one line a failed run ends with. Under torchrun the first process speaks for all: the others leave it
    time to fail too (torchrun then ends them, their line unsaid), and say their own line only if it goes on,
    which means the error was theirs alone. Were they to exit at once, torchrun could end the first process
    before it had printed, and the run would end without its reason."""
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        print(error if isinstance(error, Interrupted) else f"error: {error}", file=sys.stderr)
    elif not isinstance(error, Interrupted):  # Ctrl-C reaches every process: the first one says it
        time.sleep(FIRST_PROCESS_GRACE_S)
        print(f"process {rank}: error: {error}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        report(e)
        sys.exit(130 if isinstance(e, Interrupted) else 1)
    except KeyboardInterrupt:  # before training began: nothing was written
        print("interrupted", file=sys.stderr)
        sys.exit(130)
