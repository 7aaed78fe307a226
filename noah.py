"""NOAH, the Non-glObal Attentive Head, and the backbones of the paper, in one file.

    Li & Yao, "NOAH: Learning Pairwise Object Category Attentions for Image Classification" (2022).

A classifier usually ends with global average pooling and one linear layer: the feature map is
squeezed into one vector before any class is considered. NOAH keeps the map and lets every class
look for itself where in the image it is. Read this file top to bottom:

  1. The heads: `NOAH` (the paper's idea) and `GAPHead` (the standard head it replaces).
  2. CNN backbones: ResNet, MobileNetV2, MobileNetV3-Small, ShuffleNetV2.
  3. Token backbones: DeiT and PVT (vision transformers), MLP-Mixer and gMLP (MLPs).
  4. The model zoo: `create_model(name, ...)` and `list_models()`, with the paper's settings.
  5. Seeing the POCAs: `poca_maps` and `show_pocas`; `class_evidence` (NOAH's, and the standard head's class
     activation map) and `show_evidence`. Scoring maps against objects' boxes is evaluation: localize.py.
  6. Checkpoints: `load_checkpoint` (this project's, the original's, torchvision's, timm's), `load_backbone`.

Every model has `forward_features(x)`, which returns the last feature map (B, C, H, W), and a
`head` that turns that map into logits: `model(x) == model.head(model.forward_features(x))`.
Token backbones lay their patch tokens out as such a map, so one NOAH module serves them all.
Shapes in comments use B batch, C channels, H x W positions of the feature map (L = H*W), N heads, K
classes; an image is (3, height, width) pixels.
"""
import math
import re
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

import torch
from einops import einsum, rearrange, reduce
from torch import nn

# ------------------------------------------------------------------------------------------------
# 1. The heads
# ------------------------------------------------------------------------------------------------


class HeadwiseLinear(nn.Module):
    """N independent linear maps, one per head, applied at every position: (N, D, M) -> (N, K, M).

    This is a 1x1 convolution with `groups=N` (the original repository writes it that way); keeping
    the weight as (N, K, D) makes the per-head structure visible, and with the M = B*L positions of
    the whole batch laid out last it is one batched matrix product, bias added in the same call.
    Weights are drawn normal with the given std (NOAH chooses it), biases start at zero.
    """

    def __init__(self, heads, in_dim, out_dim, std):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(heads, out_dim, in_dim) * std)
        self.bias = nn.Parameter(torch.zeros(heads, out_dim))

    def forward(self, x):
        # (N, K, 1) + (N, K, D) @ (N, D, M) -> (N, K, M)
        return torch.baddbmm(rearrange(self.bias, "n k -> n k 1"), self.weight, x)


class NOAH(nn.Module):
    """The Non-glObal Attentive Head: logits from Pairwise Object Category Attentions (POCAs).

    Each class has, in each head, a learned *query*: a vector that is scored against the key at every
    position, as in attention (`self.query` holds them all, the original's name). From the last feature
    map x (B, C, H, W), `forward` computes, one line per step:

    1. Split, two levels. The first Ck = int(C * key_ratio) channels are keys, the other Cv = C - Ck
       values; keys and values are each cut into N = head_num groups, the heads:
           keys (B, N, Ck/N, L)    values (B, N, Cv/N, L)
    2. Interaction. In each head, every class's query scored against the keys (a 1x1 projection: the
       queries are the rows of Wq) gives one score per class and position; a softmax over the L positions
       turns each class's scores into a spatial attention map, the POCA of that class in that head. A 1x1
       projection of the values (Wv) gives each class a value at each position:
           A = softmax_L(Wq keys + bq)                        (B, N, K, L), sums to 1 over L
           V = dropout(Wv values + bv)                        (B, N, K, L)
    3. Aggregation. Each class's logit is its values weighted by its attention, summed over
       positions and heads:
           logit[b, k] = sum_n sum_l A[b, n, k, l] * V[b, n, k, l]      (B, K)

    With uniform attention (A = 1/L everywhere) the keys drop out and NOAH is GAP + FC over the value
    channels alone: their average over positions, then one linear layer. NOAH learns a separate weighting
    per class and head. It has K * C + 2 * N * K parameters against K * C + K for GAP + FC over all C
    channels: (2N - 1) * K more, 7,000 for N = 4 and 1000 classes.

    Layout. The formula reads naturally in (B, N, K, L), but `forward` keeps the heads first and the
    positions of the whole batch last: keys (N, Ck/N, B*L), scores (N, K, B*L). Each projection is then
    one batched matrix product over the heads with its bias fused in, nothing is permuted after the
    split, and the softmax runs over the contiguous last axis. Tensors of K * N * B * L numbers are the
    head's whole cost, so this layout is what makes it fast (bench.py, section 2, measures it against the
    original's grouped 1x1 convolutions). The maps it returns are in the usual (B, N, K, H, W).

    Initialization. The original builds both projections as grouped 1x1 convolutions initialized Kaiming
    normal in fan-out mode: std = sqrt(2 / (N * K)). Its per-weight scale so grows as the class count K
    shrinks (x 13 from K = 1000 to K = 6): on a few classes the logits start large, and the first loss far
    above ln K, the loss of a model that knows nothing; the quick runs train from a handicap.
    `init="scaled"` (the default) draws the same numbers at the scale they have for K = 1000, whatever K:
    std = sqrt(2 / (N * 1000)), the original's exactly at K = 1000. `init="original"` keeps the original's
    for any K. Two more, which docs/init.md measures against them: "linear" draws at the scale of a linear
    layer's default, std = 1 / sqrt(3 D) for D inputs per head, and "zero_value" draws the keys' projection
    as "scaled" and starts the values' at zero (all logits 0). The MLP models (Mixer, gMLP) then draw both
    projections again, LeCun normal as the original does (`init_mixer_weights`), so `init` changes nothing there.
    """

    INITS = ("scaled", "original", "linear", "zero_value")

    INIT_CLASSES = 1000  # the class count at which "scaled" and "original" coincide: ImageNet's

    def __init__(self, in_channels, num_classes, head_num=4, key_ratio=0.5, dropout=0.0, init="scaled"):
        super().__init__()
        if init not in self.INITS:
            raise ValueError(f"init={init!r}: choose 'scaled' (the original's scale at 1000 classes, for any "
                             f"number of classes), 'original', 'linear' or 'zero_value'")
        if not 0 < key_ratio < 1:
            raise ValueError(f"key_ratio={key_ratio} must lie strictly between 0 and 1: it is the share of "
                             f"the {in_channels} channels used as keys, the rest being values")
        key_channels = int(in_channels * key_ratio)
        value_channels = in_channels - key_channels
        if key_channels == 0:
            raise ValueError(f"key_ratio={key_ratio} leaves no key channels out of {in_channels}; "
                             f"use key_ratio >= {1 / in_channels:.4g}")
        check_head_num(head_num, key_channels, value_channels)
        self.head_num = head_num
        self.key_channels = key_channels
        key_dim, value_dim = key_channels // head_num, value_channels // head_num
        value_std = 0.0 if init == "zero_value" else self.init_std(init, num_classes, value_dim)
        self.query = HeadwiseLinear(head_num, key_dim, num_classes, self.init_std(init, num_classes, key_dim))
        self.value = HeadwiseLinear(head_num, value_dim, num_classes, value_std)
        self.dropout = nn.Dropout(dropout)

    def init_std(self, init, num_classes, in_dim):
        """The std of a projection's weights under each init (see above)."""
        if init == "original":
            return math.sqrt(2.0 / (self.head_num * num_classes))
        if init == "linear":
            return 1 / math.sqrt(3 * in_dim)
        return math.sqrt(2.0 / (self.head_num * self.INIT_CLASSES))  # "scaled", and the keys of "zero_value"

    def forward(self, x, maps=False):
        """(B, C, H, W) -> logits (B, K); with maps=True, (logits, POCAs, evidence), the maps (B, N, K, H, W): the
        evidence is each head's attention x value for each class at each position, which sums to the logits."""
        batch, _, H, W = x.shape
        per_image = partial(rearrange, pattern="n k (b l) -> n k b l", b=batch)
        # 1. split: keys and values, each into N heads (the heads first, every position of the batch last)
        keys = rearrange(x[:, : self.key_channels], "b (n d) h w -> n d (b h w)", n=self.head_num)  # (N, Ck/N, B*L)
        values = rearrange(x[:, self.key_channels:], "b (n d) h w -> n d (b h w)", n=self.head_num)  # (N, Cv/N, B*L)
        # 2. interaction: each class's query in each head scored against the key at every position,
        scores = per_image(self.query(keys))                  # (N, K, B, L)
        #    a softmax over each image's positions (the POCAs), and each class's value at every position; the
        #    softmax in float32 under autocast too, as CUDA's autocast runs it (a CPU's would keep bfloat16)
        attention = scores.float().softmax(dim=-1)            # (N, K, B, L), sums to 1 over L
        values = per_image(self.dropout(self.value(values)))  # (N, K, B, L)
        # 3. aggregation: attention times value, summed over the heads and the positions
        evidence = attention * values                         # (N, K, B, L)
        logits = reduce(evidence, "n k b l -> b k", "sum")    # (B, K)
        if not maps:
            return logits
        as_maps = partial(rearrange, pattern="n k b (h w) -> b n k h w", h=H, w=W)
        return logits, as_maps(attention), as_maps(evidence)

    def pocas(self, x):
        """Every class's POCA in every head, on the feature map's grid: (B, C, H, W) -> (B, N, K, H, W),
        each map summing to 1 over its H x W positions."""
        return self(x, maps=True)[1]


def check_head_num(head_num, key_channels, value_channels):
    """NOAH splits keys and values into head_num equal groups: head_num must divide both."""
    if not isinstance(head_num, int) or head_num < 1:
        raise ValueError(f"head_num must be a positive integer, got {head_num!r}")
    if key_channels % head_num or value_channels % head_num:
        common = math.gcd(key_channels, value_channels)
        working = [n for n in range(1, common + 1) if common % n == 0]
        raise ValueError(f"head_num={head_num} must divide both the {key_channels} key channels and the "
                         f"{value_channels} value channels; head_num values that work here: {working}")


class GAPHead(nn.Module):
    """The standard head NOAH replaces: global average pooling, dropout, one linear layer."""

    def __init__(self, in_channels, num_classes, dropout=0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.fc(self.dropout(reduce(x, "b c h w -> b c", "mean")))


def build_head(head, in_channels, num_classes=1000, **head_args):
    """`head="noah"` (head_num, key_ratio, dropout, init: see NOAH) or `head="gap"` (dropout) on a C-channel map."""
    heads = {"noah": NOAH, "gap": GAPHead}
    if head not in heads:
        raise ValueError(f"unknown head {head!r}; choose one of {sorted(heads)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return heads[head](in_channels, num_classes, **head_args)


# ------------------------------------------------------------------------------------------------
# 2. CNN backbones
#
# Layer names follow the original NOAH repository (and torchvision), so that their checkpoints
# map onto these models key for key. Each backbone builds its head with `build_head` on its last
# feature map; `forward_features` returns that map.
# ------------------------------------------------------------------------------------------------

ReLU = partial(nn.ReLU, inplace=True)
ReLU6 = partial(nn.ReLU6, inplace=True)
HardSwish = partial(nn.Hardswish, inplace=True)


class Classifier(nn.Module):
    """A backbone and its head. Subclasses set `self.head` and define `forward_features`."""

    def forward(self, x):
        return self.head(self.forward_features(x))


def conv_bn_act(in_channels, out_channels, kernel_size=1, stride=1, groups=1, act=ReLU):
    """Convolution (no bias, 'same' padding) -> BatchNorm -> activation; act=None for a linear one."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers, *([act()] if act else []))


def init_cnn_weights(model):
    """The original initialization of ResNet and the MobileNets (ShuffleNetV2 keeps PyTorch's)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --- ResNet (He et al., 2016) --------------------------------------------------------------------


def projection_shortcut(in_channels, out_channels, stride):
    """1x1 conv + BN where a residual block changes resolution or width, else None (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs and a shortcut (ResNet18/34)."""

    expansion = 1

    def __init__(self, in_channels, width, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = projection_shortcut(in_channels, width, stride)
        self.relu = ReLU()

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as torchvision's 'ResNet v1.5'), 1x1 expand x4, shortcut."""

    expansion = 4

    def __init__(self, in_channels, width, stride=1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = projection_shortcut(in_channels, out_channels, stride)
        self.relu = ReLU()

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(Classifier):
    """ResNet: a 7x7 stem, then four stages of residual blocks at strides 4, 8, 16, 32.

    (B, 3, H, W) -> forward_features -> (B, 512 * expansion, H/32, W/32) -> head -> (B, K)
    """

    def __init__(self, block, depths, head="noah", **head_args):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = 64
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            blocks = []
            for j in range(depth):
                blocks.append(block(channels, width, stride=2 if i > 0 and j == 0 else 1))
                channels = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = channels
        self.head = build_head(head, channels, **head_args)
        init_cnn_weights(self)

    def forward_features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer1(x)  # (B, 64 * e, H/4, W/4)
        x = self.layer2(x)  # (B, 128 * e, H/8, W/8)
        x = self.layer3(x)  # (B, 256 * e, H/16, W/16)
        return self.layer4(x)  # (B, 512 * e, H/32, W/32)


# --- MobileNetV2 (Sandler et al., 2018) and MobileNetV3-Small (Howard et al., 2019) ----------------


class InvertedResidual(nn.Module):
    """The mobile block: expand (1x1), depthwise conv, project back (1x1, linear); a residual
    connection when the block keeps the resolution and the width. `conv` holds the layers."""

    def __init__(self, conv, residual):
        super().__init__()
        self.conv = conv
        self.residual = residual

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def make_divisible(value, divisor=8):
    """Round a scaled width to the nearest multiple of `divisor`, losing at most 10% (the TF rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class MobileNetV2(Classifier):
    """MobileNetV2 at a width multiplier: inverted residuals with ReLU6, last 1x1 conv to 1280.

    (B, 3, H, W) -> forward_features -> (B, 1280, H/32, W/32) -> head -> (B, K)
    """

    # expansion t, output channels c, blocks n, stride of the first block s
    stages = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, width_mult=1.0, head="noah", **head_args):
        super().__init__()
        channels = make_divisible(32 * width_mult)
        features = [conv_bn_act(3, channels, 3, 2, act=ReLU6)]
        for t, c, n, s in self.stages:
            out_channels = make_divisible(c * width_mult)
            for i in range(n):
                features.append(self.block(channels, out_channels, s if i == 0 else 1, t))
                channels = out_channels
        self.num_features = make_divisible(1280 * max(1.0, width_mult))
        features.append(conv_bn_act(channels, self.num_features, act=ReLU6))
        self.features = nn.Sequential(*features)
        self.head = build_head(head, self.num_features, **head_args)
        init_cnn_weights(self)

    @staticmethod
    def block(in_channels, out_channels, stride, expansion):
        hidden = int(round(in_channels * expansion))
        expand = [conv_bn_act(in_channels, hidden, act=ReLU6)] if expansion != 1 else []
        conv = nn.Sequential(*expand,
                             conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=ReLU6),  # depthwise
                             *conv_bn_act(hidden, out_channels, act=None))  # linear projection
        return InvertedResidual(conv, residual=stride == 1 and in_channels == out_channels)

    def forward_features(self, x):
        return self.features(x)


class SqueezeExcite(nn.Module):
    """Channel attention: pool, squeeze to C/4, excite back to C, hard-sigmoid gate."""

    def __init__(self, channels, reduction=4):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction, bias=False), ReLU(),
                                nn.Linear(channels // reduction, channels, bias=False), nn.Hardsigmoid())

    def forward(self, x):
        gate = self.fc(reduce(x, "b c h w -> b c", "mean"))  # (B, C)
        return x * rearrange(gate, "b c -> b c 1 1")


class MobileNetV3Small(Classifier):
    """MobileNetV3-Small as in the original NOAH repository.

    Its tail, after the 576-channel 1x1 conv, is a 1x1 conv to 1280 channels with bias and
    h-swish. With the NOAH head that conv runs at every position, so the POCAs see a 1280-channel
    map; with the standard head the map is pooled first, as in the MobileNetV3 paper.

    (B, 3, H, W) -> forward_features -> (B, 1280, H/32, W/32), or (B, 1280, 1, 1) -> head -> (B, K)
    """

    # kernel, expanded channels, output channels, squeeze-excite, activation, stride
    blocks = [(3, 16, 16, True, ReLU, 2), (3, 72, 24, False, ReLU, 2), (3, 88, 24, False, ReLU, 1),
              (5, 96, 40, True, HardSwish, 2), (5, 240, 40, True, HardSwish, 1), (5, 240, 40, True, HardSwish, 1),
              (5, 120, 48, True, HardSwish, 1), (5, 144, 48, True, HardSwish, 1), (5, 288, 96, True, HardSwish, 2),
              (5, 576, 96, True, HardSwish, 1), (5, 576, 96, True, HardSwish, 1)]

    def __init__(self, head="noah", **head_args):
        super().__init__()
        features = [conv_bn_act(3, 16, 3, 2, act=HardSwish)]
        channels = 16
        for kernel, expanded, out_channels, se, act, stride in self.blocks:
            conv = nn.Sequential(*conv_bn_act(channels, expanded, act=act),
                                 *conv_bn_act(expanded, expanded, kernel, stride, groups=expanded, act=None),
                                 SqueezeExcite(expanded) if se else nn.Identity(), act(),
                                 *conv_bn_act(expanded, out_channels, act=None))
            features.append(InvertedResidual(conv, residual=stride == 1 and channels == out_channels))
            channels = out_channels
        features.append(conv_bn_act(channels, 576, act=HardSwish))
        self.features = nn.Sequential(*features)
        self.pool_first = head != "noah"
        self.conv_head = nn.Sequential(nn.Conv2d(576, 1280, 1), HardSwish())
        self.num_features = 1280
        self.head = build_head(head, self.num_features, **head_args)
        init_cnn_weights(self)

    def forward_features(self, x):
        x = self.features(x)  # (B, 576, H/32, W/32)
        if self.pool_first:
            x = reduce(x, "b c h w -> b c 1 1", "mean")
        return self.conv_head(x)  # (B, 1280, H/32, W/32), or (B, 1280, 1, 1)


# --- ShuffleNetV2 (Ma et al., 2018) --------------------------------------------------------------


class ShuffleBlock(nn.Module):
    """Split the channels in two, convolve one half (or, when downsampling, both branches see the
    whole input), concatenate, and shuffle the channels so the halves mix in the next block."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        half = out_channels // 2
        self.stride = stride
        if stride > 1:
            depthwise = conv_bn_act(in_channels, in_channels, 3, stride, groups=in_channels, act=None)
            self.branch1 = nn.Sequential(*depthwise, *conv_bn_act(in_channels, half))
        self.branch2 = nn.Sequential(*conv_bn_act(in_channels if stride > 1 else half, half),
                                     *conv_bn_act(half, half, 3, stride, groups=half, act=None),
                                     *conv_bn_act(half, half))

    def forward(self, x):
        if self.stride == 1:
            kept, x = x.chunk(2, dim=1)
        else:
            kept = self.branch1(x)
        out = torch.cat((kept, self.branch2(x)), dim=1)
        return rearrange(out, "b (g c) h w -> b (c g) h w", g=2)  # channel shuffle


class ShuffleNetV2(Classifier):
    """ShuffleNetV2: a 3x3 stem and max-pool, three stages of shuffle blocks, a last 1x1 conv.

    (B, 3, H, W) -> forward_features -> (B, 1024, H/32, W/32) -> head -> (B, K)
    """

    def __init__(self, depths=(4, 8, 4), widths=(24, 116, 232, 464, 1024), head="noah", **head_args):
        super().__init__()
        self.conv1 = conv_bn_act(3, widths[0], 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = widths[0]
        for i, (depth, width) in enumerate(zip(depths, widths[1:-1])):
            blocks = [ShuffleBlock(channels if j == 0 else width, width, 2 if j == 0 else 1) for j in range(depth)]
            self.add_module(f"stage{i + 2}", nn.Sequential(*blocks))
            channels = width
        self.conv5 = conv_bn_act(channels, widths[-1])
        self.num_features = widths[-1]
        self.head = build_head(head, self.num_features, **head_args)

    def forward_features(self, x):
        x = self.maxpool(self.conv1(x))  # (B, 24, H/4, W/4)
        x = self.stage2(x)  # (B, 116, H/8, W/8)
        x = self.stage3(x)  # (B, 232, H/16, W/16)
        x = self.stage4(x)  # (B, 464, H/32, W/32)
        return self.conv5(x)  # (B, 1024, H/32, W/32)


# ------------------------------------------------------------------------------------------------
# 3. Token backbones: ViTs (DeiT, PVT) and MLPs (MLP-Mixer, gMLP)
#
# These work on a sequence of patch tokens (B, L, C). With the NOAH head, all patch tokens after
# the final norm are laid out again as a feature map (B, C, H, W) and the very same NOAH module
# reads it: there is no class token. With the standard head, DeiT and PVT classify their class
# token (returned as a 1x1 map, so the head's pooling leaves it as it is) and Mixer and gMLP the
# mean of their tokens. Layer names follow timm, as the original NOAH repository's do.
# ------------------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth: in training, skip a residual branch for a random subset of the samples."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], *[1] * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class PatchEmbed(nn.Module):
    """Cut the image into patches and embed each: (B, 3, height, width) -> tokens (B, H*W, C) and the grid (H, W)."""

    def __init__(self, in_channels, dim, patch_size, norm=False):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x):
        if min(x.shape[-2:]) < self.patch_size:
            raise ValueError(f"input of {tuple(x.shape[-2:])} pixels is smaller than one {self.patch_size}x"
                             f"{self.patch_size} patch")
        x = self.proj(x)
        return self.norm(rearrange(x, "b c h w -> b (h w) c")), x.shape[-2:]


def drop_path_rates(last, depth):
    """Stochastic depth grows linearly with depth, from 0 at the first block to `last` at the last."""
    return [last * i / max(depth - 1, 1) for i in range(depth)]


def tokens_to_map(tokens, grid):
    """(B, h*w, C) -> (B, C, h, w): patch tokens laid out as the feature map the head reads."""
    return rearrange(tokens, "b (h w) c -> b c h w", h=grid[0])


def resize_pos_embed(pos_embed, grid, new_grid):
    """Position embeddings (1, h*w, C) learnt on one grid, interpolated to another (bicubic, as DeiT's
    fine-tuning and timm resize them)."""
    if tuple(grid) == tuple(new_grid):
        return pos_embed
    pos_embed = rearrange(pos_embed, "1 (h w) c -> 1 c h w", h=grid[0])
    pos_embed = nn.functional.interpolate(pos_embed, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return rearrange(pos_embed, "1 c h w -> 1 (h w) c")


class Mlp(nn.Module):
    """Linear -> GELU -> [gate] -> Linear, with dropout. A gate that halves the width makes gMLP's block."""

    def __init__(self, dim, hidden, drop=0.0, gate=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.gate = gate if gate is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden // 2 if gate is not None else hidden, dim)

    def forward(self, x):
        return self.drop(self.fc2(self.gate(self.drop(self.act(self.fc1(x))))))


class Attention(nn.Module):
    """Multi-head self-attention. With sr_ratio > 1 (PVT), keys and values come from a copy of the
    tokens shrunk sr_ratio times per side by a strided conv: the spatial-reduction attention."""

    def __init__(self, dim, heads, sr_ratio=1, drop=0.0):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, grid):
        context = x  # (B, L, C)
        if self.sr_ratio > 1:
            context = self.sr(tokens_to_map(x, grid))
            context = self.norm(rearrange(context, "b c h w -> b (h w) c"))  # (B, L / sr^2, C)
        q = rearrange(self.q(x), "b l (n d) -> b n l d", n=self.heads)
        k, v = rearrange(self.kv(context), "b l (two n d) -> two b n l d", two=2, n=self.heads)
        out = nn.functional.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.proj_drop(self.proj(rearrange(out, "b n l d -> b l (n d)")))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, dim, heads, mlp_ratio, sr_ratio=1, drop=0.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, sr_ratio, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x, grid):
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def add_positions(tokens, pos_embed, learnt_grid, grid, cls_token=None):
    """Patch tokens (B, L, C) plus their position embeddings (resized from the grid they were learnt
    on), with the class token and its own embedding put in front when there is one: (B, [1 +] L, C)."""
    if cls_token is None:
        return tokens + resize_pos_embed(pos_embed, learnt_grid, grid)
    tokens = torch.cat((cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
    return tokens + torch.cat((pos_embed[:, :1], resize_pos_embed(pos_embed[:, 1:], learnt_grid, grid)), dim=1)


def head_input(tokens, grid, class_token):
    """What the head reads: the class token as a 1x1 map (B, C, 1, 1), or else every patch token laid
    out as a feature map (B, C, h, w)."""
    if class_token:
        return rearrange(tokens[:, 0], "b c -> b c 1 1")
    return tokens_to_map(tokens, grid)


def init_vit_weights(model):
    """DeiT's and PVT's initialization: truncated normal (std .02) for linear layers and embeddings."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in model.named_parameters():
        if name.startswith(("pos_embed", "cls_token")):
            nn.init.trunc_normal_(p, std=0.02)


class VisionTransformer(Classifier):
    """DeiT: the plain ViT. Patches of 16x16, a stack of transformer blocks at one resolution.

    (B, 3, H, W) -> forward_features -> (B, C, H/16, W/16) with NOAH, the class token (B, C, 1, 1)
    with the standard head -> head -> (B, K). Position embeddings are learnt for img_size and
    interpolated for other input sizes. With representation_size, a "pre-logits" layer (linear + tanh,
    at every token) widens the tokens to that many channels before the head, as the original DeiT code
    does for DeiTs narrower than 192 (its x0.75 and x0.5 checkpoints have it; the paper's counts do not).
    """

    no_weight_decay = ("pos_embed", "cls_token")  # exempt from weight decay, as in DeiT

    def __init__(self, dim, depth, heads, patch_size=16, mlp_ratio=4, img_size=224, drop_rate=0.0,
                 drop_path_rate=0.0, representation_size=None, head="noah", **head_args):
        super().__init__()
        self.patch_embed = PatchEmbed(3, dim, patch_size)
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.class_token = head != "noah"
        if self.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        positions = self.grid[0] * self.grid[1] + (1 if self.class_token else 0)  # the class token has one too
        self.pos_embed = nn.Parameter(torch.zeros(1, positions, dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, drop=drop_rate, drop_path=p) for p in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pre_logits = nn.Identity()
        if representation_size:
            self.pre_logits = nn.Sequential(OrderedDict(fc=nn.Linear(dim, representation_size), act=nn.Tanh()))
        self.num_features = representation_size or dim
        self.head = build_head(head, self.num_features, **head_args)
        init_vit_weights(self)

    def forward_features(self, x):
        x, grid = self.patch_embed(x)  # (B, L, C)
        x = self.pos_drop(add_positions(x, self.pos_embed, self.grid, grid, getattr(self, "cls_token", None)))
        for block in self.blocks:
            x = block(x, grid)
        return head_input(self.pre_logits(self.norm(x)), grid, self.class_token)


class PyramidVisionTransformer(Classifier):
    """PVT: four stages at strides 4, 8, 16, 32 (a patch embedding before each), with
    spatial-reduction attention so that the early, large stages stay affordable.

    (B, 3, H, W) -> forward_features -> (B, C4, H/32, W/32) with NOAH, the class token (B, C4, 1, 1)
    with the standard head -> head -> (B, K). Needs inputs of at least 32x32.
    """

    no_weight_decay = ("cls_token",)  # PVT's position embeddings decay, unlike DeiT's

    def __init__(self, dims, heads, mlp_ratios, depths, sr_ratios=(8, 4, 2, 1), img_size=224, drop_rate=0.0,
                 drop_path_rate=0.0, head="noah", **head_args):
        super().__init__()
        self.class_token = head != "noah"
        rates = iter(drop_path_rates(drop_path_rate, sum(depths)))
        self.grids, channels = [], 3
        for i in range(4):
            patch = 4 if i == 0 else 2
            grid = img_size // 4 // 2 ** i
            self.grids.append((grid, grid))
            extra_token = self.class_token and i == 3  # the class token joins in the last stage
            self.add_module(f"patch_embed{i + 1}", PatchEmbed(channels, dims[i], patch, norm=True))
            pos_embed = nn.Parameter(torch.zeros(1, grid * grid + extra_token, dims[i]))
            self.register_parameter(f"pos_embed{i + 1}", pos_embed)
            self.add_module(f"pos_drop{i + 1}", nn.Dropout(drop_rate))
            self.add_module(f"block{i + 1}", nn.ModuleList(
                TransformerBlock(dims[i], heads[i], mlp_ratios[i], sr_ratios[i], drop_rate, next(rates))
                for _ in range(depths[i])))
            channels = dims[i]
        if self.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[3]))
        self.norm = nn.LayerNorm(dims[3], eps=1e-6)
        self.num_features = dims[3]
        self.head = build_head(head, dims[3], **head_args)
        init_vit_weights(self)

    def forward_features(self, x):
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"PVT needs inputs of at least 32x32 pixels, got {tuple(x.shape[-2:])}")
        for i in range(4):
            x, grid = getattr(self, f"patch_embed{i + 1}")(x)  # (B, L_i, C_i)
            cls_token = getattr(self, "cls_token", None) if i == 3 else None  # joins in the last stage
            x = add_positions(x, getattr(self, f"pos_embed{i + 1}"), self.grids[i], grid, cls_token)
            x = getattr(self, f"pos_drop{i + 1}")(x)
            for block in getattr(self, f"block{i + 1}"):
                x = block(x, grid)
            if i < 3:
                x = tokens_to_map(x, grid)  # (B, C_i, h, w), the next stage's input
        return head_input(self.norm(x), grid, self.class_token)


class MixerBlock(nn.Module):
    """MLP-Mixer block: an MLP across tokens (mixes positions), then an MLP across channels."""

    def __init__(self, dim, num_tokens, drop=0.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(num_tokens, int(dim * 0.5), drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, dim * 4, drop=drop)

    def forward(self, x):
        mixed = rearrange(self.mlp_tokens(rearrange(self.norm1(x), "b l c -> b c l")), "b c l -> b l c")
        x = x + self.drop_path(mixed)
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class SpatialGatingUnit(nn.Module):
    """gMLP's gate: split the channels in two, mix the second half across tokens (one linear layer
    over positions), and multiply the first half by it."""

    def __init__(self, dim, num_tokens):
        super().__init__()
        self.norm = nn.LayerNorm(dim // 2)
        self.proj = nn.Linear(num_tokens, num_tokens)

    def forward(self, x):
        u, v = x.chunk(2, dim=-1)  # (B, L, C/2) each
        v = einsum(self.norm(v), self.proj.weight, "b l c, m l -> b m c") + rearrange(self.proj.bias, "m -> m 1")
        return u * v


class GatedBlock(nn.Module):
    """gMLP block: x + channel MLP (6x wide) whose middle is gated by a spatial gating unit."""

    def __init__(self, dim, num_tokens, drop=0.0, drop_path=0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, dim * 6, drop=drop, gate=SpatialGatingUnit(dim * 6, num_tokens))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        return x + self.drop_path(self.mlp_channels(self.norm(x)))


def init_mixer_weights(model):
    """The MLP models' initialization in timm, as the original used it: Xavier-uniform linear layers,
    LeCun-normal convolutions (and the NOAH projections), zero GAP + FC head, a near-identity gate."""
    def lecun_normal_(weight, fan_in):
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # a normal truncated at 2 std has std 0.88
        nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if name.startswith("head"):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
            else:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
                if "mlp" in name:  # MLP biases start as tiny noise
                    nn.init.normal_(m.bias, std=1e-6)
        elif isinstance(m, nn.Conv2d):
            lecun_normal_(m.weight, m.weight[0].numel())
            nn.init.zeros_(m.bias)
        elif isinstance(m, HeadwiseLinear):
            lecun_normal_(m.weight, m.weight.shape[-1])
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():  # after the loop above, which would overwrite it: gates start near 1
        if isinstance(m, SpatialGatingUnit):
            nn.init.normal_(m.proj.weight, std=1e-6)
            nn.init.ones_(m.proj.bias)


class MlpMixer(Classifier):
    """MLP-Mixer and gMLP: 16x16 patches, then blocks of MLPs only (`block` picks the kind).

    Their token-mixing layers have one weight per position, so a model is built for one input size
    (img_size) and reads only that size. (B, 3, S, S) -> forward_features -> (B, C, S/16, S/16) -> head.
    """

    def __init__(self, dim, depth, block=MixerBlock, patch_size=16, img_size=224, drop_rate=0.0,
                 drop_path_rate=0.0, head="noah", **head_args):
        super().__init__()
        self.img_size = img_size
        self.stem = PatchEmbed(3, dim, patch_size)
        num_tokens = (img_size // patch_size) ** 2
        # the original's MLP models drop every block with the same probability
        self.blocks = nn.Sequential(*[block(dim, num_tokens, drop_rate, drop_path_rate) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.num_features = dim
        self.head = build_head(head, dim, **head_args)
        init_mixer_weights(self)

    def forward_features(self, x):
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"this model was built for {self.img_size}x{self.img_size} inputs, got "
                             f"{tuple(x.shape[-2:])}; its token-mixing layers fix the number of patches, so "
                             f"create it for your size: create_model(name, img_size={x.shape[-1]})")
        x, grid = self.stem(x)
        return tokens_to_map(self.norm(self.blocks(x)), grid)


# ------------------------------------------------------------------------------------------------
# 4. The model zoo
# ------------------------------------------------------------------------------------------------

MEAN_STD = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # most models were trained with these
            "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}  # the MLP models (timm's Inception normalization)
TOKEN_FAMILIES = ("deit", "pvt", "mixer", "gmlp")  # the backbones with img_size, drop_rate and drop_path_rate


@dataclass(frozen=True)
class ModelEntry:
    """What the zoo knows of a model. `build(head=..., num_classes=..., **head and backbone settings)`;
    `family` names its training recipe in train.py; head_num (N), key_ratio (r) and dropout are the NOAH
    head's settings from the paper's tables and the original training commands; the rest is how the
    original prepared its inputs for evaluation: normalization (a key of MEAN_STD), resize to
    img_size / crop_pct then centre crop, and the resize's interpolation."""

    build: Callable
    family: str
    head_num: int
    key_ratio: float
    dropout: float
    normalize: str = "imagenet"
    crop_pct: float = 0.875
    interpolation: str = "bilinear"

    @property
    def data_config(self):
        mean, std = MEAN_STD[self.normalize]
        return dict(mean=mean, std=std, crop_pct=self.crop_pct, interpolation=self.interpolation)


def cnn(build, family, head_num, key_ratio, dropout):
    return ModelEntry(build, family, head_num, key_ratio, dropout)


def vit(build, family):  # every ViT of the paper: N=4, r=1/2, dropout 0.1; evaluated as DeiT with bicubic resizing
    return ModelEntry(build, family, 4, 1 / 2, 0.1, interpolation="bicubic")


def mlp(build, family):  # every MLP of the paper: N=4, r=1/2, dropout 0.1; evaluated as in timm's MLP configs
    return ModelEntry(build, family, 4, 1 / 2, 0.1, normalize="inception", crop_pct=0.9, interpolation="bicubic")


PVT_TINY = dict(heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), depths=(2, 2, 2, 2))
MODELS = {
    "resnet18": cnn(partial(ResNet, BasicBlock, (2, 2, 2, 2)), "resnet", 4, 1 / 2, 0.1),
    "resnet34": cnn(partial(ResNet, BasicBlock, (3, 4, 6, 3)), "resnet", 4, 1 / 2, 0.1),  # not in the paper: as R18
    "resnet50": cnn(partial(ResNet, Bottleneck, (3, 4, 6, 3)), "resnet", 4, 1 / 8, 0.1),
    "resnet101": cnn(partial(ResNet, Bottleneck, (3, 4, 23, 3)), "resnet", 4, 1 / 8, 0.1),
    "resnet152": cnn(partial(ResNet, Bottleneck, (3, 8, 36, 3)), "resnet", 4, 1 / 8, 0.1),
    "mobilenetv2_100": cnn(partial(MobileNetV2, 1.0), "mobilenetv2", 8, 1 / 4, 0.2),
    "mobilenetv2_075": cnn(partial(MobileNetV2, 0.75), "mobilenetv2", 8, 1 / 4, 0.2),
    "mobilenetv2_050": cnn(partial(MobileNetV2, 0.5), "mobilenetv2", 8, 1 / 4, 0.2),
    "mobilenetv2_035": cnn(partial(MobileNetV2, 0.35), "mobilenetv2", 8, 1 / 4, 0.2),
    "mobilenetv3_small": cnn(MobileNetV3Small, "mobilenetv3", 8, 1 / 4, 0.2),
    "shufflenetv2_100": cnn(ShuffleNetV2, "shufflenetv2", 8, 1 / 4, 0.0),
    "deit_tiny_patch16_224": vit(partial(VisionTransformer, dim=192, depth=12, heads=3), "deit"),
    "deit_small_patch16_224": vit(partial(VisionTransformer, dim=384, depth=12, heads=6), "deit"),
    "deit_base_patch16_224": vit(partial(VisionTransformer, dim=768, depth=12, heads=12), "deit"),
    "deit_tiny_075_patch16_224": vit(partial(VisionTransformer, dim=144, depth=12, heads=3), "deit"),
    "deit_tiny_050_patch16_224": vit(partial(VisionTransformer, dim=96, depth=12, heads=3), "deit"),
    "pvt_tiny": vit(partial(PyramidVisionTransformer, dims=(64, 128, 320, 512), **PVT_TINY), "pvt"),
    "pvt_tiny_075": vit(partial(PyramidVisionTransformer, dims=(48, 96, 240, 384), **PVT_TINY), "pvt"),
    "pvt_tiny_050": vit(partial(PyramidVisionTransformer, dims=(32, 64, 160, 256), **PVT_TINY), "pvt"),
    "mixer_s16_224": mlp(partial(MlpMixer, dim=512, depth=8), "mixer"),
    "mixer_b16_224": mlp(partial(MlpMixer, dim=768, depth=12), "mixer"),
    "mixer_s16_075_224": mlp(partial(MlpMixer, dim=384, depth=8), "mixer"),
    "mixer_s16_050_224": mlp(partial(MlpMixer, dim=256, depth=8), "mixer"),
    "gmlp_ti16_224": mlp(partial(MlpMixer, dim=128, depth=30, block=GatedBlock), "gmlp"),
    "gmlp_s16_224": mlp(partial(MlpMixer, dim=256, depth=30, block=GatedBlock), "gmlp"),
    "gmlp_ti16_075_224": mlp(partial(MlpMixer, dim=96, depth=30, block=GatedBlock), "gmlp"),
    "gmlp_ti16_050_224": mlp(partial(MlpMixer, dim=64, depth=30, block=GatedBlock), "gmlp"),
}


def list_models(families=None):
    """The names `create_model` accepts, optionally only those of some families (e.g. ("resnet",))."""
    return [name for name, entry in MODELS.items() if families is None or entry.family in families]


def model_entry(name):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


def create_model(name, num_classes=1000, head="noah", head_num=None, key_ratio=None, dropout=None, img_size=None,
                 drop_rate=None, drop_path_rate=None, representation_size=None, head_init=None):
    """Build a model by name, with the NOAH head (default) or the standard head ("gap").

    Every keyword left out or given as None takes its default. head_num, key_ratio and dropout default to
    the paper's setting for that backbone. The standard head has no head_num or key_ratio; its dropout
    defaults to 0, as in the original repository, whose baselines leave --dropout unused. head_init (NOAH
    only) is one of NOAH.INITS, "scaled" by default (see NOAH's docstring); the MLP models draw their NOAH
    projections LeCun-normal, as the original does, whatever the class count, so it changes nothing there.

    img_size (default 224) is the input size a token backbone is built for: its position embeddings are
    learnt on that grid (DeiT and PVT interpolate them for other sizes), and the token-mixing layers of
    Mixer and gMLP exist only for it. drop_rate (dropout inside the blocks) and drop_path_rate (stochastic
    depth) default to 0. CNNs read any input size, so they ignore img_size (which must still be at least
    32); they have neither kind of dropout, so a non-zero drop_rate or drop_path_rate for a CNN is refused.

    representation_size (DeiT only, default None): a pre-logits layer, linear to that many channels and tanh,
    between the backbone and the head. The original DeiT code adds one (to 192) to DeiTs narrower than 192,
    so its DeiT-Tiny x0.75 and x0.5 checkpoints need `representation_size=192`; the paper's parameter counts
    are those without it.

    The model's `data_config` says how its inputs are normalized and cropped for evaluation.

    >>> model = create_model("resnet50")                 # NOAH, N=4, r=1/8: 25,564,032 parameters
    >>> baseline = create_model("resnet50", head="gap")  # GAP + FC: 25,557,032 parameters
    """
    entry = model_entry(name)
    head_args = head_settings(entry, head, head_num, key_ratio, dropout, head_init)
    backbone_args = backbone_settings(name, entry, img_size, drop_rate, drop_path_rate, representation_size)
    model = entry.build(head=head, num_classes=num_classes, **head_args, **backbone_args)
    model.data_config = entry.data_config
    return model


def head_settings(entry, head, head_num, key_ratio, dropout, head_init):
    """The head's keywords: those given, the rest from the paper's setting for the backbone."""
    if dropout is not None and not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout} must lie in [0, 1)")
    if head == "noah":
        given = dict(head_num=head_num, key_ratio=key_ratio, dropout=dropout)
        return {**{key: getattr(entry, key) if value is None else value for key, value in given.items()},
                "init": head_init or "scaled"}
    if head == "gap":
        if head_num is not None or key_ratio is not None or head_init is not None:
            raise ValueError("head_num and key_ratio (and head_init) set the NOAH head; the 'gap' head has neither: "
                             "leave them unset or use head='noah'")
        return dict(dropout=0.0 if dropout is None else dropout)
    raise ValueError(f"unknown head {head!r}; choose 'noah' or 'gap'")


def backbone_settings(name, entry, img_size, drop_rate, drop_path_rate, representation_size):
    """img_size, drop_rate, drop_path_rate and representation_size checked, and passed on where the
    backbone has them."""
    if img_size is not None and (not isinstance(img_size, int) or img_size < 32):
        raise ValueError(f"img_size={img_size!r} must be an integer of at least 32 (pixels per side)")
    rates = dict(drop_rate=drop_rate, drop_path_rate=drop_path_rate)
    for key, rate in rates.items():
        if rate is not None and not 0 <= rate < 1:
            raise ValueError(f"{key}={rate} must lie in [0, 1)")
    if representation_size is not None and (entry.family != "deit" or representation_size < 1):
        raise ValueError(f"representation_size={representation_size!r} is the pre-logits layer of the original DeiTs: "
                         f"a positive width, for the deit_* models only")
    if entry.family in TOKEN_FAMILIES:
        given = dict(img_size=img_size, representation_size=representation_size, **rates)
        return {key: value for key, value in given.items() if value is not None}
    used = [f"{key}={rate}" for key, rate in rates.items() if rate]
    if used:
        raise ValueError(f"{name} is a CNN without dropout inside its blocks or stochastic depth, so {', '.join(used)} "
                         f"cannot apply; those settings are for the {'/'.join(TOKEN_FAMILIES)} backbones")
    return {}


# ------------------------------------------------------------------------------------------------
# 5. Seeing the POCAs, and where each head finds its evidence
# ------------------------------------------------------------------------------------------------


@contextmanager
def evaluating(model):
    """Run the model in eval mode without gradients, then put it back as it was."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


def _logits_and_pocas(model, images):
    """The logits (B, K) of images (B, 3, height, width) and every class's POCAs in every head (B, N, K, H, W),
    from one pass of a model with the NOAH head, in eval mode."""
    if not isinstance(model.head, NOAH):
        raise ValueError("POCA maps come from the NOAH head; this model has the standard head")
    with evaluating(model):
        logits, pocas, _ = model.head(model.forward_features(images), maps=True)
    return logits, pocas


def poca_maps(model, images, classes=None, upsample=True):
    """For pictures: the POCAs of one class per image, in every head, from a model with the NOAH head.

    images: (B, 3, height, width) pixels, normalized as the model expects. classes: None for each image's
    predicted class, an int, or a (B,) tensor. Returns (maps, classes, logits): maps (B, N, height, width),
    each head's map of the class on the feature grid upsampled bilinearly to the image's pixels (a picture
    of it: upsampled, a map no longer sums to 1), or with upsample=False the maps themselves, (B, N, H, W)
    on the feature grid, each summing to 1 over its H x W positions (`model.head.pocas` gives every class's);
    the classes shown (B,); the logits (B, K). The model is run in eval mode.
    """
    logits, maps = _logits_and_pocas(model, images)  # maps (B, N, K, H, W)
    if classes is None:
        classes = logits.argmax(dim=1)
    classes = torch.as_tensor(classes, device=maps.device).expand(len(images))
    maps = maps[torch.arange(len(images)), :, classes]  # (B, N, H, W)
    if upsample:
        maps = nn.functional.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return maps, classes, logits


def class_evidence(model, images, per_head=False):
    """Where each class's logit comes from: for each image and class, a map over the last feature map's
    positions whose sum is exactly that logit (eval mode), so that both heads can be compared on the same images.

    NOAH: attention x value summed over the heads, (B, K, H, W); with per_head=True, (B, N, K, H, W).
    GAP + FC: the class activation map (CAM, Zhou et al. 2016), the linear layer applied at every position and
    divided by the number of positions, (W f + b) / L, (B, K, H, W): pooling then the layer is its sum.
    A standard head that is not a sum over positions (DeiT and PVT read their class token; MobileNetV3-Small
    pools before a non-linear layer) has no such map: a ValueError says so.
    """
    reason = not_a_sum_over_positions(model)
    if reason:
        raise ValueError(f"no class evidence for this {type(model).__name__}: {reason}; its NOAH head has exact "
                         f"evidence (head='noah'), and so do the standard heads of ResNet, MobileNetV2, "
                         f"ShuffleNetV2, Mixer and gMLP")
    if per_head and not isinstance(model.head, NOAH):
        raise ValueError("per_head=True: only the NOAH head has heads")
    with evaluating(model):
        features = model.forward_features(images)  # (B, C, H, W)
        if isinstance(model.head, NOAH):
            _, _, evidence = model.head(features, maps=True)  # (B, N, K, H, W)
            return evidence if per_head else evidence.sum(dim=1)
        fc, positions = model.head.fc, features.shape[-2] * features.shape[-1]
        cam = einsum(features, fc.weight, "b c h w, k c -> b k h w") + rearrange(fc.bias, "k -> k 1 1")
        return cam / positions


def not_a_sum_over_positions(model):
    """Why a model's logits are not a sum of per-position evidence, or None where they are."""
    if isinstance(model.head, NOAH):
        return None
    if getattr(model, "class_token", False):
        return "its standard head classifies the class token, not a sum over the positions"
    if getattr(model, "pool_first", False):
        return "its standard head pools before a non-linear 1x1 conv (h-swish), so the logit is no sum over positions"
    return None


def denormalize(image, mean, std):
    """A normalized image (3, height, width) back to a (height, width, 3) array in [0, 1], for matplotlib.
    mean, std: three numbers each (a list, a tuple or a tensor)."""
    mean, std = (torch.as_tensor(v, dtype=torch.float32).cpu().reshape(-1, 1, 1) for v in (mean, std))
    return rearrange((image.detach().cpu() * std + mean).clamp(0, 1), "c h w -> h w c").numpy()


def one_image(image):
    """The figures draw one image: (3, height, width), or a batch of one (1, 3, height, width)."""
    if image.ndim == 4 and len(image) == 1:
        return image[0]
    if image.ndim != 3:
        raise ValueError(f"image of shape {tuple(image.shape)}: give one image, (3, height, width) or "
                         f"(1, 3, height, width)")
    return image


def show_pocas(model, image, class_names=None, top_k=3, mean=None, std=None, upsample="nearest"):
    """Draw what NOAH looked at in one image: a row for each of its top-k classes (named, with its softmax score)
    showing the image alone, then the image under the mean of the heads' POCA maps, then under each head's map,
    all on one colour scale. upsample="nearest" shows the feature grid's true cells, "smooth" interpolates.

    image: (3, height, width) or (1, 3, height, width), normalized with mean and std (default: the model's data_config).
    Returns a Figure.
    """
    import matplotlib.pyplot as plt  # slow to import, and only the figures need it

    image = one_image(image)
    picture = denormalize(image, *normalization(model, mean, std))
    logits, pocas = _logits_and_pocas(model, image[None])
    scores, top = logits.softmax(dim=1)[0].topk(min(top_k, logits.shape[1]))
    grid = rearrange(pocas[0, :, top], "n k h w -> k n h w").cpu()  # (top_k, N, H, W): the top classes' maps
    heads, (H, W) = grid.shape[1], grid.shape[-2:]
    panels = torch.cat([grid.mean(dim=1, keepdim=True), grid], dim=1)  # (top_k, 1 + N, H, W)
    fig, axes = plt.subplots(len(top), heads + 2, figsize=(1.6 * (heads + 2) + 1, 1.7 * len(top) + 0.7),
                             squeeze=False, layout="constrained")
    for row, (score, k) in enumerate(zip(scores.tolist(), top.tolist())):
        axes[row, 0].imshow(picture)
        axes[row, 0].set_ylabel(f"{class_name(class_names, k)} ({score:.0%})", fontsize=9)
        for col, panel in enumerate(panels[row]):
            shown = overlay(axes[row, col + 1], picture, panel, upsample, cmap="viridis", vmin=0,
                            vmax=panels.max().item())
    titles = ["image", f"mean of {heads} heads"] + [f"head {n + 1}" for n in range(heads)]
    finish_figure(fig, axes, titles, f"POCA maps on the {H} x {W} feature grid ({upsample} upsampling)")
    fig.colorbar(shown, ax=axes, shrink=0.8, label="attention (a map sums to 1)")
    return fig


def show_evidence(models, image, class_names=None, top_k=2, mean=None, std=None, upsample="nearest"):
    """NOAH against the standard head, side by side on one image: for each of the first model's top-k classes,
    the image, then for each model (a dict, label -> model) where it finds that class: a NOAH model's POCA
    (mean of the heads) and its class evidence, a standard head's class activation map (CAM). The evidence
    maps share one colour scale (red for, blue against the class; each sums to its model's logit), and so do
    the attention maps. image: (3, height, width) or (1, 3, height, width).
    """
    import matplotlib.pyplot as plt  # slow to import, and only the figures need it

    image, first = one_image(image), next(iter(models.values()))
    picture = denormalize(image, *normalization(first, mean, std))
    with evaluating(first):
        logits = first(image[None])
        scores, top = logits.softmax(dim=1)[0].topk(min(top_k, logits.shape[1]))
    columns, titles, grids = [], ["image"], {}  # columns: (kind, maps (top_k, H, W)), one per panel
    for label, model in models.items():
        evidence = class_evidence(model, image[None])[0]  # (K, H, W)
        grids[label] = " x ".join(map(str, evidence.shape[-2:]))
        if isinstance(model.head, NOAH):
            pocas = _logits_and_pocas(model, image[None])[1][0]  # (N, K, H, W)
            columns.append(("attention", pocas[:, top].mean(dim=0)))  # the top classes' maps, mean of the heads
            titles.append(f"{label}: POCA")
        columns.append(("evidence", evidence[top]))
        titles.append(f"{label}: {'evidence' if isinstance(model.head, NOAH) else 'CAM'}")
    limit = {kind: max((maps.abs().max().item() for k, maps in columns if k == kind), default=0.0)
             for kind in ("attention", "evidence")}
    styles = {"attention": dict(cmap="viridis", vmin=0, vmax=limit["attention"]),
              "evidence": dict(cmap="RdBu_r", vmin=-limit["evidence"], vmax=limit["evidence"])}
    fig, axes = plt.subplots(len(top), len(columns) + 1, figsize=(2.1 * (len(columns) + 1) + 1.2, 2.1 * len(top) + 0.7),
                             squeeze=False, layout="constrained")
    shown = {}
    for row, (score, k) in enumerate(zip(scores.tolist(), top.tolist())):
        axes[row, 0].imshow(picture)
        axes[row, 0].set_ylabel(f"{class_name(class_names, k)} ({score:.0%})", fontsize=9)
        for col, (kind, maps) in enumerate(columns):
            shown[kind] = overlay(axes[row, col + 1], picture, maps[row].cpu(), upsample, **styles[kind])
    where = (f"the {grids[label]} feature grid" if len(set(grids.values())) == 1 else
             "feature grids of " + ", ".join(f"{grid} ({label})" for label, grid in grids.items()))
    first_label = next(iter(models))
    finish_figure(fig, axes, titles, f"every model's maps of {first_label}'s top classes ({first_label}'s "
                                     f"probabilities), on {where} ({upsample} upsampling)")
    for kind, label in (("attention", "attention"), ("evidence", "evidence (sums to the logit)")):
        if kind in shown:
            fig.colorbar(shown[kind], ax=axes, shrink=0.8, label=label)
    return fig


def normalization(model, mean, std):
    config = getattr(model, "data_config", {})  # set by create_model; ImageNet's normalization otherwise
    return (config.get("mean", MEAN_STD["imagenet"][0]) if mean is None else mean,
            config.get("std", MEAN_STD["imagenet"][1]) if std is None else std)


def class_name(class_names, k):
    """How a figure names class k: ImageNet's name for a WordNet id (folders of ImageNet: n03888257, parachute)."""
    name = class_names[k] if class_names is not None else f"class {k}"
    return imagenet_names().get(name, name)


@lru_cache(maxsize=None)
def imagenet_names():
    """WordNet id -> ImageNet class name, from docs/imagenet_classes.txt (the 1000 ids sorted: ImageNet's order)."""
    lines = (Path(__file__).parent / "docs" / "imagenet_classes.txt").read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines)


def overlay(ax, picture, grid_map, upsample, **style):
    """The picture, and over it (half transparent) a map on the feature grid stretched to the picture's size:
    upsample="nearest" draws the grid's true cells, "smooth" interpolates bilinearly."""
    if upsample not in ("nearest", "smooth"):
        raise ValueError(f"upsample={upsample!r}: choose 'nearest' (the true grid) or 'smooth'")
    height, width = picture.shape[:2]
    ax.imshow(picture)
    return ax.imshow(torch.as_tensor(grid_map).cpu().numpy(), extent=(0, width, height, 0), alpha=0.6,
                     interpolation="nearest" if upsample == "nearest" else "bilinear", **style)


def finish_figure(fig, axes, column_titles, title):
    for ax, column_title in zip(axes[0], column_titles):
        ax.set_title(column_title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)


# ------------------------------------------------------------------------------------------------
# 6. Checkpoints: this project's, the original repository's, torchvision's and timm's
#
# A checkpoint is read safely (`weights_only=True`), its state dict taken out of whatever holds it, and
# every key brought into this file's layout by the conversions below, each the same weights under
# another name or shape:
#   - wrappers: `module.` (DataParallel, DistributedDataParallel, the EMA's AveragedModel) and `_orig_mod.`
#     (torch.compile) in front of every key are dropped, and so is the EMA's count `n_averaged`;
#   - the standard head: `fc.` (torchvision's ResNet and ShuffleNetV2), `classifier.1.` (torchvision's
#     MobileNetV2, the original MobileNetV3), `head.2.` (the original CNNs: pool, flatten, linear) and
#     timm's bare `head.weight` all become `head.fc.`; the original MobileNetV3's NOAH head is `classifier.`;
#   - the original MobileNetV3's 1280-channel conv, `features.13` (before NOAH) or `features.14` (after
#     the standard head's pooling), is `conv_head.0` here;
#   - DeiT's fused attention input `attn.qkv` (rows: q, then k and v) is split into `attn.q` and `attn.kv`,
#     as PVT keeps them;
#   - the NOAH projections, grouped 1x1 convolutions in the original, (N*K, D, 1, 1) weights and (N*K,)
#     biases, are the same numbers in the same order as this file's (N, K, D) and (N, K).
# ------------------------------------------------------------------------------------------------


def read_checkpoint(path):
    """A checkpoint file's contents (a dict), read with `weights_only=True`: a file from the internet cannot
    run code when loaded. Besides plain data only argparse.Namespace is allowed, as DeiT and timm store
    their arguments so. Any other file is a ValueError that says in its own words what the file is."""
    from argparse import Namespace  # imported only to be allowed in: DeiT and timm save their arguments as one

    with open(path, "rb") as f:  # FileNotFoundError as it is
        empty = not f.read(1)
    try:
        if empty:
            raise EOFError
        with torch.serialization.safe_globals([Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # what torch.load raises says little, and advises the unsafe way round
        raise ValueError(f"cannot read {path} as a checkpoint: {unreadable_because(e, empty)}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"cannot read {path} as a checkpoint: it holds a {type(checkpoint).__name__}, not a "
                         f"checkpoint (a dict with a state dict)")
    return checkpoint


def unreadable_because(error, empty):
    if empty:
        return "the file is empty"
    if "Unsupported global" in str(error):
        return ("it holds Python objects other than tensors and plain data, which are refused: loading them could "
                "run code")
    if "PytorchStreamReader" in str(error):
        return "it is truncated or damaged (an incomplete PyTorch zip file)"
    return "it is not a PyTorch checkpoint file"


def read_state_dict(source):
    """The state dict of a checkpoint (a path or a loaded dict): under 'state_dict' (this project, the
    original repository, timm), under 'model' (DeiT, PVT), under 'ema' (a file of train.py's EMA weights
    alone), or the whole dict (torchvision, or train.py's `checkpoint["ema"]` itself)."""
    checkpoint = source if isinstance(source, dict) else read_checkpoint(source)
    state = next((checkpoint[key] for key in ("state_dict", "model", "ema") if key in checkpoint), checkpoint)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("this is not a checkpoint: it holds no state dict of tensors")
    return state


RENAMES = [  # (pattern, replacement), in this order; the section's comment says whose names these are
    (r"^((module|_orig_mod)\.)+", ""),
    (r"^classifier\.1\.", "head.fc."),
    (r"^classifier\.", "head."),
    (r"^head\.2\.", "head.fc."),
    (r"^fc\.", "head.fc."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]


def to_this_layout(state, expected):
    """Another layout's state dict in this file's, for the model whose state dict has the shapes `expected`."""
    converted = {}
    for key, value in state.items():
        if key == "n_averaged":  # how many updates an EMA (torch's AveragedModel) has had: not a weight
            continue
        for pattern, replacement in RENAMES:
            key = re.sub(pattern, replacement, key)
        if "conv_head.0.weight" in expected:  # the original MobileNetV3
            key = re.sub(r"^features\.1[34]\.(weight|bias)$", r"conv_head.0.\1", key)
        if key.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            q, kv = value.split([value.shape[0] // 3, 2 * value.shape[0] // 3])
            converted[key.replace("qkv", "q")], converted[key.replace("qkv", "kv")] = q, kv
            continue
        if re.fullmatch(r"head\.(query|value)\.(weight|bias)", key) and key in expected \
                and value.shape != expected[key] and value.numel() == math.prod(expected[key]):
            value = value.reshape(expected[key])  # grouped-convolution layout
        converted[key] = value
    return converted


def load_checkpoint(model, source, strict=True):
    """Load a checkpoint into `model` (returned): a file path or an already loaded dict.

    Reads this project's checkpoints, the original NOAH repository's (CNNs, and the timm-style DeiT, PVT,
    Mixer and gMLP models), torchvision's and timm's (see `read_state_dict` and `to_this_layout`). With
    strict=True any missing, unexpected or differently shaped key is an error that names them, and says
    which model the file seems to be for.
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state, as_stored = in_this_layout(read_state_dict(source), expected)
    check_fit(state, expected, strict, as_stored)
    model.load_state_dict(state, strict=strict)
    return model


def in_this_layout(state, expected):
    """The state dict converted for the model (`to_this_layout`), and as stored: converted too but with its
    head's weights in their own shapes, which say what the file was made for (used in error messages)."""
    backbone = {k: shape for k, shape in expected.items() if not k.startswith("head.")}
    return to_this_layout(state, expected), to_this_layout(state, backbone)


def load_backbone(model, source):
    """Fine-tuning: load a checkpoint's backbone (every key outside `head.`) into `model`, and its head
    only where it fits as it is (the same head and number of classes); returns whether the head was loaded.

    The class token is the standard head's way of reading a ViT, and the pre-logits layer of the original
    narrow DeiTs sits between backbone and head: each is taken when both have it alike and left out
    otherwise. Position embeddings are interpolated to the model's grid, their class-token row taken or
    left out the same way.
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state, as_stored = in_this_layout(read_state_dict(source), expected)
    for key in [k for k in state if "pos_embed" in k and k in expected and state[k].shape != expected[k]]:
        state[key] = fit_pos_embed(state[key], model.state_dict()[key])
    for key in [k for k in {*state, *expected} if k == "cls_token" or k.startswith("pre_logits.")]:
        if key not in state or key not in expected or state[key].shape != expected[key]:
            state.pop(key, None)
            expected.pop(key, None)
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    head_fits = set(head) == {k for k in expected if k.startswith("head.")} and all(
        v.shape == expected[k] for k, v in head.items())
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    check_fit(backbone, {k: v for k, v in expected.items() if not k.startswith("head.")}, strict=True, whole=as_stored)
    model.load_state_dict({**backbone, **(head if head_fits else {})}, strict=False)
    return head_fits


def fit_pos_embed(saved, current):
    """Position embeddings (1, [1 +] h*w, C) of a square grid, made to fit another: patch rows interpolated,
    the class-token row taken from `saved` where both have one, kept from `current` where only it has one."""
    split = lambda pos: (pos[:, :1], pos[:, 1:]) if math.isqrt(pos.shape[1]) ** 2 != pos.shape[1] else (None, pos)
    (saved_cls, saved_grid), (current_cls, current_grid) = split(saved), split(current)
    side, new_side = math.isqrt(saved_grid.shape[1]), math.isqrt(current_grid.shape[1])
    grid = resize_pos_embed(saved_grid, (side, side), (new_side, new_side))
    if current_cls is None:
        return grid
    return torch.cat((saved_cls if saved_cls is not None else current_cls, grid), dim=1)


def check_fit(state, expected, strict, whole=None):
    """Raise a ValueError naming every key that does not fit, and the model that `whole` (the file's whole
    state dict, by default `state`) seems to be for."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(shape)}" for k, shape in expected.items()
                if k in state and state[k].shape != shape]
    if reshaped or (strict and (missing or unexpected)):
        problems = [f"{label} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("shapes differ, file vs model", reshaped)) if keys]
        guess = guess_model(state if whole is None else whole)
        if guess:
            problems.append(f"the file seems to be for {guess}")
        if "pre_logits.fc.weight" in unexpected:
            problems.append("the file has the pre-logits layer of the original narrow DeiTs: build the model with "
                            f"create_model(name, representation_size={state['pre_logits.fc.weight'].shape[0]})")
        raise ValueError("checkpoint does not fit the model: " + "; ".join(problems))


def pre_logits_width(source):
    """The width of the pre-logits layer that the original narrow DeiTs have, if a checkpoint has one."""
    try:
        state = read_state_dict(source)
    except ValueError:  # not a checkpoint: load_checkpoint says so in its own words
        return None
    return next((value.shape[0] for key, value in state.items() if key.endswith("pre_logits.fc.weight")), None)


def stored_num_classes(source, head_num):
    """How many classes a checkpoint's head has (either head, any layout; head_num: N, which the original's
    grouped-convolution layout does not store), or None if it holds no head this file knows."""
    try:
        state = to_this_layout(read_state_dict(source), {})
    except ValueError:
        return None
    fc, query = state.get("head.fc.weight"), state.get("head.query.weight")
    if fc is not None:
        return fc.shape[0]
    if query is not None:  # (N, K, D), or the grouped convolution's (N*K, D, 1, 1)
        return query.shape[1] if query.ndim == 3 else query.shape[0] // head_num
    return None


def guess_model(state):
    """Which model of this file a state dict (in this layout) fits, described, or None."""
    for name in MODELS:
        for head in ("noah", "gap"):
            layout = layout_of(name, head)
            if {k for k in state if not k.startswith("head.")} != set(layout) or any(
                    state[k].shape != shape for k, shape in layout.items()):
                continue
            if head == "gap" and "head.fc.weight" in state:
                return f"{name} with the standard head, {state['head.fc.weight'].shape[0]} classes"
            if head == "noah" and "head.query.weight" in state:
                return f"{name} with {describe_noah_head(state, MODELS[name].head_num)}"
    return None


def describe_noah_head(state, paper_heads):
    """"NOAH (N=.., r=..), K classes", read off a state dict's head in this layout or the grouped-conv one."""
    query, value = state["head.query.weight"], state["head.value.weight"]
    per_head = query.ndim == 3  # (N, K, D); else (N*K, D, 1, 1), which does not store N: the paper's is assumed
    heads = query.shape[0] if per_head else paper_heads
    key_dim, value_dim = (w.shape[-1] if w.ndim == 3 else w.shape[1] for w in (query, value))
    return f"NOAH (N={heads}, r={key_dim / (key_dim + value_dim):g}), {stored_num_classes(state, paper_heads)} classes"


@lru_cache(maxsize=None)
def layout_of(name, head):
    """The backbone's keys and shapes of a model (built on the 'meta' device: no memory, no time)."""
    with torch.device("meta"):
        model = create_model(name, head=head)
    return {k: v.shape for k, v in model.state_dict().items() if not k.startswith("head.")}
