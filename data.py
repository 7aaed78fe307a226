"""The data of train.py: datasets, transforms (timm's RandAugment among them), MixUp/CutMix, and the loaders.

A loader hands out (index, seed) pairs, and each sample is loaded and augmented with torch's random numbers
seeded by its seed alone: so a resumed run sees the same augmented images, whatever the number of workers.
"""
import functools
import math
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import datasets
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import noah


class UserError(Exception):
    """A problem with the command line, the data or a file: reported in one line, without a traceback."""


# --- Datasets ------------------------------------------------------------------------------------------------------


class Shapes(Dataset):
    """Synthetic images made on the fly, each fixed by (seed, index): one shape, a circle, square,
    triangle, cross, ring or diamond, of random colour, size and place, on a cluttered background
    (smooth greyish noise and random strokes). `sample(i)` also gives the object's bounding box, so
    POCA maps can be checked against where the object really is. No download, any size."""

    classes = ("circle", "square", "triangle", "cross", "ring", "diamond")

    def __init__(self, num_samples=2000, img_size=64, seed=0, transform=None):
        self.num_samples = num_samples
        self.img_size = img_size
        self.seed = seed
        self.transform = transform

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


class Unreadable(Exception):
    """An image file that cannot be decoded (corrupt, truncated, empty): skipped, as one in a million may be."""


def read_image(path):
    """The image folders' loader: the picture in RGB, or Unreadable naming the file, so that a file that
    cannot be read is told apart from an augmentation that fails on a readable one."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except OSError as e:  # what PIL raises for a file it cannot decode (UnidentifiedImageError included)
        raise Unreadable(f"{path} ({e})") from None


def build_datasets(args):
    """-> train set, validation set, class names."""
    train_tf = build_transforms(args, train=True, normalize=False)
    val_tf = build_transforms(args, train=False, normalize=False)
    if args.dataset in ("imagenet", "folder"):
        if not args.data:
            raise UserError(f"--dataset {args.dataset} needs --data: a folder with train/ and val/")
        return image_folders(args.data, train_tf, val_tf)
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


def image_folders(root, train_tf, val_tf):
    """torchvision's ImageFolder for root/train and root/val, which must hold the same class folders."""
    folders = []
    for split, transform in (("train", train_tf), ("val", val_tf)):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise UserError(f"no folder {folder}: --data must hold train/ and val/, each with one sub-folder of "
                            f"images per class (for ImageNet, see the README's 'Training': 'ImageNet')")
        try:
            folders.append(datasets.ImageFolder(folder, transform, loader=read_image))
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(f"{folder} is not laid out as one sub-folder of images per class: {e}") from None
    train, val = folders
    if train.classes != val.classes:
        raise UserError(f"{root}: train/ and val/ must have the same class folders: only in train/: "
                        f"{only_in(train.classes, val.classes)}; only in val/: {only_in(val.classes, train.classes)}")
    return train, val, train.classes


def only_in(names, others, shown=5):
    """The first `shown` of `names` not among `others`, for an error message: 'plum, prune', or 'none'."""
    missing = sorted(set(names) - set(others))[:shown]
    return ", ".join(missing) or "none"


def download(make, url, placement):
    """Build a torchvision dataset that downloads itself; say where to put the files if that fails."""
    try:
        return make(download=True)
    except Exception as e:  # network errors come as many types; any of them means the same to the user
        raise UserError(f"could not download {url} ({type(e).__name__}: {e}); download it by hand and "
                        f"{placement}") from None


IMAGENETTE = {"160px": "imagenette2-160", "320px": "imagenette2-320", "full": "imagenette2"}  # size: folder
IMAGENETTE_CLASSES = {wnid: noah.imagenet_names()[wnid] for wnid in ("n01440764", "n02102040", "n02979186",
                      "n03000684", "n03028079", "n03394916", "n03417042", "n03425413", "n03445777", "n03888257")}
IMAGENETTE_URL = "NOAH_IMAGENETTE_URL"  # environment variable: where the archives are, if not at fastai's (a mirror)


def imagenette(root, img_size, train_tf, val_tf):
    """Imagenette from --data: a copy with train/ and val/, or an extracted imagenette2(-320, -160) inside (the
    size --img-size fits best first); into an empty folder, the smallest that covers --img-size is downloaded."""
    wanted = "160px" if img_size <= 160 else "320px" if img_size <= 320 else "full"
    found = sorted(os.listdir(root)) if os.path.isdir(root) else []
    extracted = [IMAGENETTE[size] for size in (wanted, "full", "320px", "160px") if IMAGENETTE[size] in found]
    if {"train", "val"} & set(found):
        folder = root
    elif extracted:
        folder = os.path.join(root, extracted[0])
    elif set(found) <= {f".{IMAGENETTE[wanted]}.partial"}:  # empty, or holding what a cut download left
        folder = download_imagenette(root, IMAGENETTE[wanted])
    else:
        shown = ", ".join(found[:4])
        if len(found) > 4:
            shown += ", ..."
        raise UserError(f"{root} holds {shown}, not Imagenette: give an "
                        f"empty folder to download it into, a copy with train/ and val/, or a folder with an "
                        f"extracted {', '.join(IMAGENETTE.values())}")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(folder, split)):
            raise UserError(f"{folder} has no {split}/ folder: extract the whole archive, or delete {folder} to "
                            f"download it again")
        missing = [wnid for wnid in IMAGENETTE_CLASSES if not os.path.isdir(os.path.join(folder, split, wnid))]
        if missing:
            raise UserError(f"{folder}/{split} has no class folder {', '.join(missing)} (Imagenette has ten, named "
                            f"{', '.join(IMAGENETTE_CLASSES)}): extract it whole, or delete {folder} to download it")
    train, val, wnids = image_folders(folder, train_tf, val_tf)
    return train, val, [IMAGENETTE_CLASSES.get(wnid, wnid) for wnid in wnids]


def download_imagenette(root, name):
    """root/name, downloaded and extracted into a hidden folder renamed when whole: a cut one never looks done."""
    url = f"{os.environ.get(IMAGENETTE_URL) or 'https://s3.amazonaws.com/fast-ai-imageclas'}/{name}.tgz"
    partial = os.path.join(root, f".{name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    download(lambda download: datasets.utils.download_and_extract_archive(url, partial, remove_finished=True),
             url, f"extract it into {root}, so that {root}/{name}/train/ and val/ exist")
    if not os.path.isdir(os.path.join(partial, name)):
        raise UserError(f"{url} holds no folder {name}/, as Imagenette's archive does")
    os.replace(os.path.join(partial, name), os.path.join(root, name))
    shutil.rmtree(partial)  # what else the archive held beside the folder
    return os.path.join(root, name)


def imagenet_classes():
    """The 1000 ImageNet class names in ImageNet's order, torchvision's names (docs/imagenet_classes.txt)."""
    return list(noah.imagenet_names().values())


# --- Transforms ----------------------------------------------------------------------------------------------------


def eval_transform(img_size, crop_pct=0.875, interpolation="bilinear", mean=noah.MEAN_STD["imagenet"][0],
                   std=noah.MEAN_STD["imagenet"][1]):
    """A picture as a model sees it in evaluation: resized to img_size / crop_pct, centre-cropped to
    img_size, normalized. `eval_transform(size, **model.data_config)` prepares it as its model expects."""
    return v2.Compose(centre_crop(img_size, crop_pct, interpolation) + to_normalized_tensor(mean, std))


def centre_crop(img_size, crop_pct, interpolation):
    resize = v2.Resize(int(img_size / crop_pct), v2.InterpolationMode(interpolation))
    return [resize, v2.CenterCrop(img_size)]


def to_normalized_tensor(mean, std):
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def build_transforms(args, train, normalize=True):
    """ImageNet-style augmentation for photos (random resized crop, flip, [RandAugment], [RandomErasing]);
    CIFAR's pad-and-crop; a flip for the synthetic sets. To evaluate: `eval_transform` (for the sets other
    than photos, whose images come at the model's size, without the crop margin: that is the identity, and
    any other picture is fitted whole).

    normalize=False (the loaders'): pictures leave as uint8 tensors, a quarter of float32's bytes through the
    workers' shared memory and the copy to the device, where `normalize_batch` makes them what normalize=True
    gives. Shapes (drawn in float) and a training set with RandomErasing (its random-normal pixels belong to
    the normalized scale) are normalized here all the same."""
    mean, std = noah.MEAN_STD[args.normalize]
    photos = args.dataset in ("imagenet", "folder", "imagenette")
    erasing = train and args.reprob > 0 and args.dataset not in ("shapes", "fake")
    if normalize or erasing or args.dataset == "shapes":
        to_tensor = to_normalized_tensor(mean, std)
    else:
        to_tensor = [v2.ToImage()]  # uint8
    if not train:
        return v2.Compose(centre_crop(args.img_size, args.crop_pct if photos else 1.0, args.interpolation) + to_tensor)
    if args.dataset in ("shapes", "fake"):
        return v2.Compose([v2.RandomHorizontalFlip(), *to_tensor])
    interpolation = args.train_interpolation or args.interpolation
    modes = ["bilinear", "bicubic"] if interpolation == "random" else [interpolation]
    modes = [v2.InterpolationMode(mode) for mode in modes]
    if args.dataset.startswith("cifar"):
        crop = []
        if args.img_size != 32:  # CIFAR's images are 32 x 32
            crop.append(v2.Resize(args.img_size, modes[0]))
        crop.append(v2.RandomCrop(args.img_size, padding=args.img_size // 8))
    else:
        scale, ratio = tuple(args.crop_scale), tuple(args.crop_ratio)
        crop = [v2.RandomResizedCrop(args.img_size, scale, ratio, interpolation=mode) for mode in modes]
        crop = [v2.RandomChoice(crop)] if len(crop) > 1 else crop  # random: bilinear or bicubic, per image
    fill = [round(255 * m) for m in mean]  # timm fills what geometric operations uncover with the mean
    augment = []
    if args.randaug:
        augment.append(RandAugment(args.randaug_n, args.randaug, args.randaug_mstd, interpolation, fill))
    erase = [v2.RandomErasing(args.reprob, value="random")] if erasing else []
    return v2.Compose(crop + [v2.RandomHorizontalFlip()] + augment + to_tensor + erase)


def normalize_batch(images, normalize):
    """A batch as the model takes it: the loader's uint8 pictures scaled to [0, 1] and normalized with
    noah.MEAN_STD[normalize] on their device (exactly what `build_transforms(normalize=True)` computes, to float
    rounding); a batch that the loader normalized already (float) as it is."""
    if images.dtype != torch.uint8:
        return images
    mean, std = mean_std_on(normalize, images.device)
    return (images.float() / 255 - mean) / std


@functools.lru_cache(maxsize=None)
def mean_std_on(normalize, device):
    """noah.MEAN_STD[normalize] as two (1, 3, 1, 1) tensors on `device`, made once: a copy to a GPU at every
    step would make the host wait for the GPU's queue of work."""
    mean, std = noah.MEAN_STD[normalize]
    return torch.tensor(mean).reshape(1, 3, 1, 1).to(device), torch.tensor(std).reshape(1, 3, 1, 1).to(device)


class RandAugment:
    """timm's RandAugment as DeiT, PVT and the MLP models used it (`rand-m9-mstd0.5-inc1`, `rand-m6-n3-mstd1.0-inc1`):
    per image, `num_ops` operations drawn with replacement from the table below, each applied with probability
    1/2 at a magnitude drawn from N(magnitude, magnitude_std) clipped to timm's 0-10 scale; timm's "increasing"
    variants, on PIL images as timm's, with torch's random numbers (so a sample's augmentation follows its seed).

    At magnitude m (0-10), with "±" a random sign:
        AutoContrast, Equalize, Invert              no argument
        Rotate                                      ±30 m/10 degrees
        Posterize                                   keep 4 - int(4 m/10) bits (none at m = 10: black)
        Solarize                                    invert the pixels >= 256 - int(256 m/10)
        SolarizeAdd                                 add int(110 m/10) to the pixels < 128
        Color, Contrast, Brightness, Sharpness      enhancement factor 1 ± 0.9 m/10
        ShearX, ShearY                              shear factor ±0.3 m/10 (about the top-left corner, as PIL's)
        TranslateX, TranslateY                      ±0.45 m/10 of the width / height
    Geometric operations fill the uncovered pixels with the normalization mean, as timm does.
    """

    OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
           "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")
    PLAIN = {"AutoContrast": TF.autocontrast, "Equalize": TF.equalize, "Invert": TF.invert}
    ENHANCE = {"Color": TF.adjust_saturation, "Contrast": TF.adjust_contrast, "Brightness": TF.adjust_brightness,
               "Sharpness": TF.adjust_sharpness}

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

    def apply(self, name, image, m):
        """One operation at magnitude m, scaled to [0, 1], on an RGB or grayscale PIL image (other modes,
        such as palette, RGBA or CMYK, are made RGB first: the operations are defined on colours)."""
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        channels = len(image.getbands())
        fill = self.fill if len(self.fill) == channels else [round(sum(self.fill) / len(self.fill))] * channels
        signed = lambda value: value if torch.rand(()) < 0.5 else -value

        def geometry():  # "random": bilinear or bicubic, drawn for each geometric operation as timm does
            mode = self.interpolation
            if mode == "random":
                mode = "bilinear" if torch.rand(()) < 0.5 else "bicubic"
            return dict(interpolation=v2.InterpolationMode(mode), fill=fill)

        height, width = TF.get_size(image)
        if name in self.PLAIN:
            return self.PLAIN[name](image)
        if name in self.ENHANCE:
            return self.ENHANCE[name](image, 1 + signed(0.9 * m))
        if name == "Rotate":
            return TF.rotate(image, signed(30 * m), **geometry())
        if name == "Posterize":  # at m = 1 no bit is kept: a black image, as timm's Pillow gave (today's refuses 0)
            bits = 4 - int(4 * m)
            return TF.posterize(image, bits) if bits else Image.new(image.mode, image.size)
        if name == "Solarize":
            threshold = 256 - int(256 * m)
            return TF.solarize(image, threshold) if threshold <= 255 else image
        if name == "SolarizeAdd":
            return image.point(lambda value: min(255, value + int(110 * m)) if value < 128 else value)
        if name in ("ShearX", "ShearY"):
            degrees = math.degrees(math.atan(signed(0.3 * m)))
            shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
            return TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0], **geometry())
        shift = [signed(0.45 * m) * width, 0] if name == "TranslateX" else [0, signed(0.45 * m) * height]
        return TF.affine(image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], **geometry())


def build_mixup_cutmix(args, num_classes):
    """MixUp and/or CutMix on whole batches (one of the two per batch when both are on), or None."""
    chosen = [mix(alpha=alpha, num_classes=num_classes)
              for mix, alpha in ((v2.MixUp, args.mixup), (v2.CutMix, args.cutmix)) if alpha > 0]
    return v2.RandomChoice(chosen) if chosen else None


# --- Loaders -------------------------------------------------------------------------------------------------------


def mix_seed(*numbers):
    """One 63-bit seed from several numbers, e.g. (run seed, epoch, rank): a different one for each combination."""
    return functools.reduce(lambda seed, n: (seed * 1_000_003 + n) % 2 ** 63, numbers, 0)


class TrainSampler(Sampler):
    """A process's share of an epoch's training images, shuffled by (run seed, epoch), as (index, seed) pairs:
    the seed, fixed by (run seed, epoch, rank, position in the epoch), draws the image's augmentation. With
    repeats > 1, DeiT's repeated augmentation: each chosen image is used `repeats` times, spread over the
    processes, each time with its own augmentation. Every process sees size // world images."""

    def __init__(self, size, world, rank, repeats, seed):
        self.size = size
        self.world = world
        self.rank = rank
        self.repeats = repeats
        self.seed = seed
        self.epoch = 0
        self.per_process = size // world

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        # mix_seed, not seed + epoch: with a sum, seed 1's epoch e would be seed 0's epoch e + 1
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch)))
        share = order.repeat_interleave(self.repeats).tolist()[self.rank::self.world][: self.per_process]
        return ((index, mix_seed(self.seed, self.epoch, self.rank, position)) for position, index in enumerate(share))

    def __len__(self):
        return self.per_process


class Failed(Exception):
    """A sample whose augmentation (or any step but reading its file) raised: handed on, not raised, so that
    the main process stops the run with its message, not a worker with its traceback."""


class Samples(Dataset):
    """Item (index, seed) of a dataset -> its sample, augmented with torch's random numbers seeded by `seed`
    alone, in a fork of the generator (whichever worker loads it; with --workers 0, MixUp's stay as they were).
    An unreadable image becomes None, with a warning naming the file; any other exception becomes Failed."""

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


def build_loaders(args, train_set, val_set, world, rank, pin):
    """Training: shuffled, each process its share, every sample's augmentation seeded (exact resumption,
    whatever the workers). Validation: image i goes to process i % world, each counted once, none padded in.

    A batch is (images, labels, the number of its unreadable images, skipped), images and labels None when
    none could be read; or the Failed sample that must stop the run (train.checked raises it)."""
    sampler = TrainSampler(len(train_set), world, rank, args.repeated_aug, args.manualSeed)
    common = dict(num_workers=args.workers, pin_memory=pin, persistent_workers=args.workers > 0,
                  collate_fn=collate_readable)
    # drop_last: a short last batch (one image, at worst) would give BatchNorm a single value per channel
    train = DataLoader(Samples(train_set), args.train_batch // world, sampler=sampler, drop_last=True, **common)
    if len(train) == 0 and not args.evaluate:
        raise UserError(f"the training set has {len(train.sampler)} images per process, fewer than one batch of "
                        f"{args.train_batch // world}: lower --train-batch")
    val_items = [(index, 0) for index in range(rank, len(val_set), world)]  # no randomness: any seed will do
    val = DataLoader(Samples(val_set), args.test_batch, sampler=val_items, **common)
    return train, val
