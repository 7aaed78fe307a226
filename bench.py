"""What NOAH costs, and whether this project's code is fast. A benchmark, not a test.

    python bench.py --device cpu --quick              # a few minutes on 2 CPU cores
    python bench.py --device cuda --json bench.json   # every CNN, DeiT-S, Mixer-S; float32 (TF32), then bf16 +
                                                      # channels_last, then the same under torch.compile
    python bench.py --summarize run1.json run2.json run3.json   # one figure from several runs: median [range]

Six sections, each row timed as the median over repeated runs after warm-up, with the spread (25th to
75th percentile), the device, precision, batch and image size, and for compiled rows the graphs Dynamo
compiled (Dynamo is reset before each row). What is compared is timed in alternation, and a ratio is the
median of the ratios within each round:
  1. head overhead: a training step (forward, backward, SGD step) and inference of each model with NOAH
     against the same model with its standard head, and their ratio, beside the ratio of their FLOPs (what
     the head's extra work must cost at least);
  2. head implementation: noah.NOAH against the same computation written as the original writes it
     (grouped 1x1 convolutions over a (B, C, 1, L) map), forward + backward, at ImageNet shapes;
  3. backbones: each CNN of noah.py against torchvision's model of the same architecture, training step;
  4. memory: a training step's peak memory (GPU) or the tensors it saves for backward (CPU), NOAH vs GAP + FC;
  5. data: the images per second train.py's loader delivers from a folder of JPEGs, per number of workers,
     over many batches after warm-up, against the speed at which the model trains: the slower one limits;
  6. precision: float32 against bfloat16 autocast + channels_last (what train.py chooses on a CPU with native
     bfloat16), training step and inference of each model with each head, the two timed alternately.
One run is not a figure on a shared machine: run a command three times with --json and --summarize them.
"""
import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import torchvision
from einops import rearrange
from PIL import Image
from torch._dynamo.utils import counters as dynamo_counters  # Dynamo's own tally of the graphs it compiled
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import data
import noah
import train

CNNS = noah.list_models(("resnet", "mobilenetv2", "mobilenetv3", "shufflenetv2"))


def seconds(step, device):
    """Wall-clock seconds of one call of `step`, waiting for the GPU to finish."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def interleaved(steps, repeats, warmup, device):
    """Time several steps in alternation, the order reversed every other round, so that drifts of the
    machine's speed touch them alike. Returns each step's seconds, round by round."""
    for step in steps:
        for _ in range(warmup):
            step()
    times = [[] for _ in steps]
    for r in range(repeats):
        order = range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))
        for i in order:
            times[i].append(seconds(steps[i], device))
    return times


def paired_ratio(numerator, denominator):
    """The median over rounds of one step's time over another's in the same round: a noisy machine slows
    both alike within a round, so this is steadier than a ratio of two medians."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def row(section, name, setting, times, against, against_times, ratio, ratio_is, **extra):
    """One timed comparison: the median and the 25th to 75th percentiles of `times` (seconds), in milliseconds,
    beside the median of what it is compared with (`against`), and their ratio."""
    low, median, high = statistics.quantiles(times, n=4)
    return dict(section=section, name=name, **setting, median_ms=1000 * median, p25_ms=1000 * low, p75_ms=1000 * high,
                against=against, against_ms=1000 * statistics.median(against_times), ratio=ratio, ratio_is=ratio_is,
                **extra)


class Variant:
    """A way to run a model: device, dtype (autocast), memory format, torch.compile. On CUDA, float32 runs in
    TF32 (matrix products and convolutions alike), as train.py does by default."""

    def __init__(self, device, dtype="float32", channels_last=False, compile=False):
        self.device = device
        self.dtype = dtype
        self.channels_last = channels_last
        self.compile = compile

    def precision(self):
        if self.dtype != "float32":
            return f"{self.dtype} autocast"
        return "float32 (TF32)" if self.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "float32"

    def setting(self, batch, img_size):
        return dict(device=describe_device(self.device), dtype=self.dtype, precision=self.precision(),
                    channels_last=self.channels_last, compile=self.compile, batch=batch, img_size=img_size)

    def fresh(self):
        """Before a row's steps are built: Dynamo forgets what it compiled for the rows before (every noah.py
        model runs the same forward code, and past its recompile limit Dynamo would run it eager)."""
        if self.compile:
            torch.compiler.reset()
            dynamo_counters.clear()

    def graphs(self):
        """The graphs Dynamo compiled since `fresh` (None when not compiling): 0 would mean eager."""
        return dynamo_counters["stats"]["unique_graphs"] if self.compile else None

    def autocast(self):
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, getattr(torch, self.dtype))

    def prepare(self, model, images):
        model = model.to(self.device)
        images = images.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        return (torch.compile(model) if self.compile else model), images

    def train_step(self, model, batch, img_size):
        """A training step's function: forward, cross-entropy, backward, SGD step."""
        images = torch.randn(batch, 3, img_size, img_size)
        targets = torch.randint(0, 1000, (batch,), device=self.device)
        net, images = self.prepare(model.train(), images)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step():
            with self.autocast():
                loss = F.cross_entropy(net(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    def inference(self, model, batch, img_size):
        net, images = self.prepare(model.eval(), torch.randn(batch, 3, img_size, img_size))

        def step():
            with torch.no_grad(), self.autocast():
                net(images)
        return step


def describe_device(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def forward_flops(model, img_size):
    """Floating-point operations of one image's forward pass, counted over convolutions and matrix products."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, img_size, img_size))
    return counter.get_total_flops()


def head_overhead(models, variant, batch, img_size, repeats, warmup):
    """NOAH's time over GAP + FC's, beside its FLOPs over theirs: what the head must cost at least."""
    rows = []
    for name in tqdm(models, desc="1. head overhead", leave=False):
        torch.manual_seed(0)
        with_noah, with_gap = noah.create_model(name), noah.create_model(name, head="gap")
        flop_ratio = forward_flops(with_noah, img_size) / forward_flops(with_gap, img_size)
        for kind, make in (("train step", variant.train_step), ("inference", variant.inference)):
            variant.fresh()
            timed = interleaved([make(with_noah, batch, img_size), make(with_gap, batch, img_size)], repeats, warmup,
                                variant.device)
            setting = variant.setting(batch, img_size)
            rows.append(row("1. head overhead", f"{name} {kind}", setting, timed[0], "GAP", timed[1],
                            paired_ratio(*timed), "NOAH time / GAP + FC time", flop_ratio=flop_ratio,
                            graphs=variant.graphs()))
    return rows


def grouped_conv_noah(head):
    """The original repository's formulation of the same head, with noah.NOAH's weights: the positions as a
    (B, C, 1, L) map, each projection a 1x1 convolution with one group per head."""
    N, K, _ = head.query.weight.shape
    query = rearrange(head.query.weight, "n k d -> (n k) d 1 1")
    value = rearrange(head.value.weight, "n k d -> (n k) d 1 1")

    def forward(x):
        x = rearrange(x, "b c h w -> b c 1 (h w)")
        B, L = x.shape[0], x.shape[-1]
        a = F.conv2d(x[:, :head.key_channels], query, head.query.bias.flatten(), groups=N).reshape(B, N, K, L)
        v = F.conv2d(x[:, head.key_channels:], value, head.value.bias.flatten(), groups=N).reshape(B, N, K, L)
        return (a.softmax(dim=-1) * head.dropout(v)).sum(dim=(1, 3))
    return forward


def head_implementation(variant, batch, repeats, warmup):
    """noah.NOAH against grouped_conv_noah on the same weights and input, forward + backward, at ImageNet shapes."""
    rows = []
    shapes = [("ResNet50's head", 2048, 4, 1 / 8), ("MobileNetV2's head", 1280, 8, 1 / 4)]
    for label, channels, heads, ratio in tqdm(shapes, desc="2. head implementation", leave=False):
        torch.manual_seed(0)
        head = noah.NOAH(channels, 1000, head_num=heads, key_ratio=ratio).to(variant.device)
        x = torch.randn(batch, channels, 7, 7, device=variant.device, requires_grad=True)
        if variant.channels_last:
            x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        grouped = grouped_conv_noah(head)
        with torch.no_grad(), variant.autocast():
            torch.testing.assert_close(head(x).float(), grouped(x).float(), rtol=2e-2, atol=2e-2)  # the same numbers

        def forward_backward(function, x=x):
            run = torch.compile(function) if variant.compile else function

            def step():
                with variant.autocast():
                    out = run(x)
                out.float().sum().backward()
            return step
        variant.fresh()
        timed = interleaved([forward_backward(head), forward_backward(grouped)], repeats, warmup, variant.device)
        what = f"{label}: {channels}x7x7, N={heads}, 1000 classes, forward + backward"
        rows.append(row("2. head implementation", what, variant.setting(batch, 7), timed[0], "grouped conv", timed[1],
                        paired_ratio(timed[1], timed[0]), "grouped-conv time / noah.NOAH time (>1: ours faster)",
                        graphs=variant.graphs()))
    return rows


TORCHVISION = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50,
               "mobilenetv2_100": torchvision.models.mobilenet_v2,
               "shufflenetv2_100": torchvision.models.shufflenet_v2_x1_0}


def backbones(models, variant, batch, img_size, repeats, warmup):
    """Each noah.py backbone (GAP + FC head) against torchvision's model of the same architecture, training step."""
    rows = []
    for name in tqdm([m for m in models if m in TORCHVISION], desc="3. backbones", leave=False):
        torch.manual_seed(0)
        ours, theirs = noah.create_model(name, head="gap"), TORCHVISION[name]()
        variant.fresh()
        timed = interleaved([variant.train_step(ours, batch, img_size), variant.train_step(theirs, batch, img_size)],
                            repeats, warmup, variant.device)
        rows.append(row("3. backbones", f"{name} train step (GAP + FC head)", variant.setting(batch, img_size),
                        timed[0], "torchvision", timed[1], paired_ratio(timed[1], timed[0]),
                        "torchvision time / noah.py time (>= 1: ours as fast)", graphs=variant.graphs()))
    return rows


def saved_for_backward_mb(model, images):
    """Megabytes of the tensors a forward pass keeps for backward (the activation memory of training)."""
    total, seen = 0, set()

    def pack(tensor):
        nonlocal total
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(images), torch.zeros(len(images), dtype=torch.long, device=images.device)).backward()
    return total / 2 ** 20


def memory(models, variant, batch, img_size):
    rows = []
    for name in tqdm(models, desc="4. memory", leave=False):
        measured = {}
        for head in ("noah", "gap"):
            torch.manual_seed(0)
            variant.fresh()
            model = noah.create_model(name, head=head).train()
            if variant.device.type == "cuda":
                step = variant.train_step(model, batch, img_size)
                step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                step()
                measured[head] = torch.cuda.max_memory_allocated() / 2 ** 20
            else:
                net, images = variant.prepare(model, torch.randn(batch, 3, img_size, img_size))
                with variant.autocast():
                    measured[head] = saved_for_backward_mb(net, images)
        what = "peak allocated, MB" if variant.device.type == "cuda" else "saved for backward, MB"
        rows.append(dict(section="4. memory", name=f"{name} train step ({what})", **variant.setting(batch, img_size),
                         noah_mb=measured["noah"], gap_mb=measured["gap"], ratio=measured["noah"] / measured["gap"],
                         ratio_is="NOAH / GAP + FC"))
    return rows


def write_jpegs(folder, count, size=(500, 375)):
    """A folder of JPEGs like ImageNet's (500x375 on average): smooth random pictures in two classes."""
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        os.makedirs(os.path.join(folder, "train", f"class{i % 2}"), exist_ok=True)
        pixels = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=size[::-1], mode="bicubic").clamp(0, 1)
        Image.fromarray((pixels[0].permute(1, 2, 0) * 255).byte().numpy()).save(
            os.path.join(folder, "train", f"class{i % 2}", f"{i}.jpg"), quality=90)


def data_pipeline(worker_counts, variant, batch, img_size, model, training_images_per_s):
    """Images per second from train.py's training loader, per number of workers, beside the training speed of
    `model` (whichever is lower limits training): timed over many batches, after a batch from each worker (the
    workers' first batches are made in parallel with nothing to wait for, and would inflate the rate)."""
    rows, timed = [], max(20, 4 * max(worker_counts))
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(folder, batch * (max(worker_counts) + 1 + timed))
        os.makedirs(os.path.join(folder, "val"))
        for workers in tqdm(worker_counts, desc="5. data", leave=False):
            args = train.parse_args(["--data", folder, "--img-size", str(img_size), "--workers", str(workers),
                                     "--train-batch", str(batch), "--manualSeed", "0"])
            transform = data.build_transforms(args, train=True, normalize=False)  # as train.py's loader: uint8
            images_folder = os.path.join(folder, "train")
            train_set = torchvision.datasets.ImageFolder(images_folder, transform, loader=data.read_image)
            loader, _ = data.build_loaders(args, train_set, train_set, 1, 0, pin=variant.device.type == "cuda")
            batches = iter(loader)
            for _ in range(workers + 1):
                next(batches)
            started = time.perf_counter()
            images = [next(batches)[0] for _ in range(timed)]  # batches: images, labels, unreadable images
            elapsed = time.perf_counter() - started
            seen = sum(len(batch_images) for batch_images in images)
            batch_mb = images[0].element_size() * images[0].nelement() / 2 ** 20
            rows.append(dict(section="5. data", name=f"train.py loader, {workers} workers, {timed} batches of JPEGs "
                             f"500x375 -> {img_size} (crop, flip)", **variant.setting(batch, img_size),
                             images_per_s=seen / elapsed, batch_mb=batch_mb, dtype_in_batches=str(images[0].dtype),
                             model=model, model_images_per_s=training_images_per_s,
                             limit="data" if seen / elapsed < training_images_per_s else "model"))
    return rows


def precision_speedup(models, device, batch, img_size, repeats, warmup):
    """float32 against bfloat16 autocast + channels_last, each model with each head, the two timed alternately
    on two copies of the same model (channels_last changes a model's layout in place)."""
    float32, bfloat16 = Variant(device), Variant(device, "bfloat16", channels_last=True)
    rows = []
    for name in tqdm(models, desc="6. precision", leave=False):
        for head in ("noah", "gap"):
            torch.manual_seed(0)
            model = noah.create_model(name, head=head)
            for kind, make in (("train step", "train_step"), ("inference", "inference")):
                steps = [getattr(variant, make)(copy.deepcopy(model), batch, img_size)
                         for variant in (float32, bfloat16)]
                timed = interleaved(steps, repeats, warmup, device)
                head_name = "NOAH" if head == "noah" else "GAP + FC"
                rows.append(row("6. precision", f"{name} {head_name} {kind}", bfloat16.setting(batch, img_size),
                                timed[1], "float32", timed[0], paired_ratio(timed[0], timed[1]),
                                "float32 time / bfloat16 time (>1: bfloat16 faster)"))
    return rows


def print_table(rows):
    print(f"\n{'section':24s} {'what':72s} {'setting':56s} {'median ms':>10s} {'p25-p75 ms':>15s}  result")
    for r in rows:
        compiled = f", compiled ({r['graphs']} graphs)" if r.get("graphs") is not None else ""
        setting = f"{r['device']}, {r['precision']}{', channels_last' if r['channels_last'] else ''}" \
                  f"{compiled}, batch {r['batch']}, {r['img_size']}px"
        if r["section"] == "4. memory":
            timing = f"{'':>10s} {'':>15s}"
            result = f"NOAH {r['noah_mb']:.0f} MB, GAP {r['gap_mb']:.0f} MB: x{r['ratio']:.3f}"
        elif r["section"] == "5. data":
            timing = f"{'':>10s} {'':>15s}"
            result = (f"{r['images_per_s']:.0f} img/s, {r['batch_mb']:.1f} MB a batch ({r['dtype_in_batches']}) "
                      f"({r['model']} trains {r['model_images_per_s']:.1f} img/s): {r['limit']} limits")
        else:
            timing = f"{r['median_ms']:10.2f} {r['p25_ms']:7.2f}-{r['p75_ms']:<7.2f}"
            result = f"{r['against']} {r['against_ms']:.2f} ms; ratio {r['ratio']:.3f} ({r['ratio_is']})"
            if "flop_ratio" in r:
                result += f"; FLOPs x{r['flop_ratio']:.3f}"
        print(f"{r['section']:24s} {r['name'][:72]:72s} {setting[:56]:56s} {timing}  {result}")


def summarize(paths):
    """One figure from several runs of the same command (--json files): per row, the median over the runs of
    its median time and of its result, with the lowest and highest run beside it."""
    runs = [json.load(open(path)) for path in paths]
    print(f"{len(runs)} runs like `{runs[0]['command']}`, torch {runs[0]['torch']}: median [lowest, highest]")
    for rows in zip(*(run["rows"] for run in runs)):
        first, figures = rows[0], []
        for key in ("median_ms", "ratio", "images_per_s"):
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                figures.append(f"{key} {statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]")
        print(f"{first['section']:24s} {first['name'][:72]:72s} {first['precision']}: {'; '.join(figures)}")


def loader_against_model(args, rows, models, variant, batch):
    """Section 5, beside section 1's training speed of ResNet50 (or the first model)."""
    trained = "resnet50" if "resnet50" in models else models[0]
    step = next(r for r in rows if r["name"] == f"{trained} train step" and r["dtype"] == variant.dtype
                and r["compile"] == variant.compile)
    return data_pipeline([0, 2] if args.quick else [0, 2, 4, 8, 16], variant, batch, args.img_size, trained,
                         batch / (step["median_ms"] / 1000))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer models and repeats: minutes on a CPU")
    parser.add_argument("--batch", type=int, help="default: 8 on CPU, 128 on GPU")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (default: 7 quick, 20 full)")
    parser.add_argument("--models", nargs="+", choices=noah.list_models(), metavar="NAME",
                        help="models of sections 1, 3 (CNNs) and 4 (default: four CNNs with --quick, else all CNNs, "
                        "DeiT-S and Mixer-S)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="CUDA: float32 matrix products and convolutions in TF32, as train.py by default")
    parser.add_argument("--sections", nargs="+", type=int, choices=range(1, 7), default=[1, 2, 3, 4, 5, 6],
                        metavar="N", help="run only these sections, e.g. --sections 1 2 (default: all six; 5 needs 1)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--summarize", nargs="+", metavar="JSON", help="only summarize runs written with --json")
    args = parser.parse_args()
    if args.summarize:
        return summarize(args.summarize)
    device = torch.device(args.device)
    if 5 in args.sections and 1 not in args.sections:
        parser.error("--sections 5 compares the loader with section 1's training step: add 1")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible to PyTorch here")
    batch = args.batch or (8 if device.type == "cpu" else 128)
    repeats, warmup = args.repeats or (7 if args.quick else 20), 2 if args.quick else 5
    models = args.models or (["resnet18", "resnet50", "mobilenetv2_100", "shufflenetv2_100"] if args.quick
                             else CNNS + ["deit_small_patch16_224", "mixer_s16_224"])
    variants = [Variant(device)]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32  # one policy for all rows
        variants += [Variant(device, "bfloat16", channels_last=True), Variant(device, "bfloat16", True, compile=True)]

    rows, sections = [], set(args.sections)
    for variant in variants:
        if 1 in sections:
            rows += head_overhead(models, variant, batch, args.img_size, repeats, warmup)
        if 2 in sections:
            rows += head_implementation(variant, batch * (4 if device.type == "cpu" else 2), repeats * 2, warmup)
        if 3 in sections:
            rows += backbones(models, variant, batch, args.img_size, repeats, warmup)
    if 4 in sections:
        rows += memory(models, variants[-1] if device.type == "cuda" else variants[0], batch, args.img_size)
    if 5 in sections:
        rows += loader_against_model(args, rows, models, variants[-1], batch)
    if 6 in sections:
        rows += precision_speedup(models, device, batch, args.img_size, repeats, warmup)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command="python bench.py " + " ".join(sys.argv[1:]),
                           torch=torch.__version__, date=time.strftime("%Y-%m-%d"), rows=rows), f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
