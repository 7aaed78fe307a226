"""Where a map points, scored against the objects' boxes: how this project measures whether POCAs, class
evidence and class activation maps (noah.py, section 5) find the object. Evaluation of the method, not the method.

  `pointing_game`    does the map's peak cell fall inside a box? (Zhang et al., 2016)
  `evidence_in_box`  the share of the map's positive mass inside the boxes, free of any threshold
  `box_hits`         box accuracy: is the box drawn around the map's high cells right, at IoU >= 0.5?
                     (MaxBoxAcc, Choe et al., CVPR 2020)
  `read_boxes`       ImageNet's human-drawn boxes for the Imagenette photos that are ImageNet validation photos
  `concentration`    how concentrated attention maps are: normalized entropy, and the peak against a uniform map
  `peak_on_edge`     does a map's peak lie on its grid's corner cells, on its outer ring?

Maps are (B, H, W) on a feature grid, boxes (x0, y0, x1, y1) in pixels of an image of (height, width), one per
image (B, 4) or several (B, M, 4) with rows of NaN where an image has fewer.
"""
import csv
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import einsum
from PIL import Image


def _box_sets(boxes):
    """Boxes (B, 4), one per image, or (B, M, 4), up to M per image (rows of NaN where an image has fewer), as
    (B, M, 4): (x0, y0, x1, y1) in pixels. An image's object is anywhere in any of its boxes."""
    return boxes[:, None] if boxes.dim() == 2 else boxes


def evidence_in_box(maps, boxes, image_size):
    """A threshold-free localization score: the share of each map's positive mass that lies inside the object's
    boxes. maps: (B, H, W) on the feature grid; boxes: see `_box_sets`, in pixels of an image of image_size
    (height, width). A grid cell counts by the fraction of its area the boxes cover (their union); a uniform map scores
    the boxes' share of the image. Returns (B,) in [0, 1]."""
    (height, width), (H, W) = image_size, maps.shape[-2:]
    x0, y0, x1, y1 = _box_sets(boxes).unbind(dim=-1)  # (B, M) each

    def covered(low, high, pixels):  # (B, M, pixels): the fraction of each pixel's extent inside [low, high]
        edges = torch.arange(pixels + 1, device=boxes.device, dtype=boxes.dtype)
        inside = torch.minimum(edges[1:], high[..., None]) - torch.maximum(edges[:-1], low[..., None])
        return inside.clamp(min=0).nan_to_num(0)

    union = einsum(covered(y0, y1, height), covered(x0, x1, width), "b m y, b m x -> b m y x").amax(dim=1)  # pixels
    inside = F.adaptive_avg_pool2d(union, (H, W))  # each cell's share inside a box: (B, H, W)
    positive = maps.clamp(min=0)
    return (positive * inside).sum(dim=(1, 2)) / positive.sum(dim=(1, 2)).clamp(min=1e-12)


def pointing_game(maps, boxes, image_size):
    """The pointing game on maps (POCAs, class evidence, CAMs): does each map's peak fall inside the object's boxes?

    maps: (B, H, W) on the feature grid (e.g. a class's maps summed over heads); the point is the centre
    of the peak cell, in pixels of an image of image_size (height, width). boxes: see `_box_sets`, in pixels.
    Returns (B,) booleans. A point drawn at random hits a box with probability its share of the image.
    """
    (height, width), (H, W) = image_size, maps.shape[-2:]
    peak = maps.flatten(1).argmax(dim=1)
    y, x = (peak[:, None] // W + 0.5) * height / H, (peak[:, None] % W + 0.5) * width / W  # (B, 1), in pixels
    x0, y0, x1, y1 = _box_sets(boxes).unbind(dim=-1)  # (B, M); NaN rows compare False
    return ((x0 <= x) & (x <= x1) & (y0 <= y) & (y <= y1)).any(dim=1)


def box_hits(maps, boxes, image_size, thresholds=100, min_iou=0.5, grid=None):
    """Box accuracy, as weakly supervised localization scores a map (Choe et al., CVPR 2020, MaxBoxAccV2): at each
    threshold, is the map's box right? -> (B, thresholds) booleans; `hits.float().mean(0).max()` is the accuracy
    at the best threshold for the whole set (MaxBoxAcc).

    Each map (B, H, W) is upsampled bilinearly to `grid` cells over the image (height, width) (default: cells of 4 x 4
    pixels), scaled to [0, 1] by its own min and max, and cut at thresholds 0, 1/T, ..., (T-1)/T: every
    8-connected region of cells at or above the threshold (at 0, the whole image) gives a box (its bounding box),
    and the image is a hit when one of these boxes overlaps one of the true boxes (see `_box_sets`) with IoU >=
    min_iou. This is MaxBoxAccV2 at the one IoU of 0.5 (V2 averages 0.3, 0.5 and 0.7), with its every-region rule,
    on a grid of cells instead of the image's pixels."""
    (height, width), (gh, gw) = image_size, grid or (image_size[0] // 4, image_size[1] // 4)
    maps = F.interpolate(maps[:, None].float(), size=(gh, gw), mode="bilinear", align_corners=False)[:, 0]
    low, high = maps.amin(dim=(1, 2), keepdim=True), maps.amax(dim=(1, 2), keepdim=True)
    maps = (maps - low) / (high - low).clamp(min=1e-12)
    cut = torch.arange(thresholds, device=maps.device) / thresholds
    cell = (height / gh, width / gw)  # a cell's size in pixels
    hits = [_region_box_iou(m >= cut[:, None, None], b, cell) >= min_iou for m, b in zip(maps, boxes)]
    return torch.stack(hits)


def concentration(maps):
    """How concentrated attention maps are, for maps (..., H, W) that each sum to 1 over their L = H x W cells (a
    POCA) -> (normalized entropy, peak over uniform), each (...,):
    normalized entropy  -sum p ln p / ln L: 1 for a uniform map, 0 for one on a single cell;
    peak over uniform   the largest cell's weight times L: 1 for a uniform map, L for one on a single cell."""
    cells = maps.flatten(-2).double()
    entropy = -torch.special.xlogy(cells, cells).sum(dim=-1) / torch.log(torch.tensor(cells.shape[-1]).double())
    return entropy.float(), (cells.amax(dim=-1) * cells.shape[-1]).float()


def peak_on_edge(maps):
    """Where each map's peak cell lies on its grid -> (corner, border) booleans (...,): corner, one of the 4 corner
    cells; border, any cell of the outer ring, corners included. Of an H x W grid's cells, the corners are 4 / (H W)
    and the ring 1 - (H - 2)(W - 2) / (H W): what a peak placed at random would score."""
    H, W = maps.shape[-2:]
    peak = maps.flatten(-2).argmax(dim=-1)
    row, column = peak // W, peak % W
    on_row_edge = (row == 0) | (row == H - 1)
    on_column_edge = (column == 0) | (column == W - 1)
    return on_row_edge & on_column_edge, on_row_edge | on_column_edge


def _region_box_iou(masks, boxes, cell):
    """The best IoU between any 8-connected region's bounding box in each mask (T, gh, gw) and any true box:
    -> (T,). Regions are labelled by spreading the largest cell index through each: along every run of cells in
    a row, then in a column, then to the 8 neighbours (a 3 x 3 max-pool), until nothing changes."""
    T, gh, gw = masks.shape
    index = torch.arange(1, gh * gw + 1, device=masks.device, dtype=torch.float).reshape(gh, gw)
    labels = torch.where(masks, index, 0.0)
    while True:
        spread = _along_runs(_along_runs(labels, masks).transpose(1, 2), masks.transpose(1, 2)).transpose(1, 2)
        spread = F.max_pool2d(spread[:, None], 3, stride=1, padding=1)[:, 0] * masks
        if torch.equal(spread, labels):
            break
        labels = spread
    t, y, x = masks.nonzero(as_tuple=True)
    ids, region = torch.unique(t * (gh * gw + 1) + labels[t, y, x].long(), return_inverse=True)  # (threshold, label)
    edge = lambda values, how: torch.zeros(len(ids), device=masks.device).scatter_reduce(0, region, values.float(), how,
                                                                                         include_self=False)
    x0, y0 = edge(x, "amin") * cell[1], edge(y, "amin") * cell[0]
    x1, y1 = (edge(x, "amax") + 1) * cell[1], (edge(y, "amax") + 1) * cell[0]
    truth = _box_sets(boxes[None])[0]  # (M, 4)
    tx0, ty0, tx1, ty1 = truth.unbind(dim=-1)
    overlap = ((torch.minimum(x1[:, None], tx1) - torch.maximum(x0[:, None], tx0)).clamp(min=0)
               * (torch.minimum(y1[:, None], ty1) - torch.maximum(y0[:, None], ty0)).clamp(min=0))
    union = ((x1 - x0) * (y1 - y0))[:, None] + (tx1 - tx0) * (ty1 - ty0) - overlap
    iou = (overlap / union).nan_to_num(0).amax(dim=1)  # (regions,): each region's best
    return torch.zeros(T, device=masks.device).scatter_reduce(0, ids // (gh * gw + 1), iou, "amax")  # best region


def _along_runs(labels, masks):
    """Each run of consecutive cells of the masks (T, rows, columns) along a row takes the largest label in it."""
    T, rows, columns = labels.shape
    run = (~masks).cumsum(dim=2)  # a cell outside the mask starts the next run (its label 0 changes no maximum)
    key = (torch.arange(T * rows, device=labels.device).reshape(T, rows, 1) * (columns + 1) + run).flatten()
    largest = torch.zeros(T * rows * (columns + 1), device=labels.device).scatter_reduce(0, key, labels.flatten(),
                                                                                          "amax")
    return largest[key].reshape(T, rows, columns) * masks


IMAGENETTE_BOXES = Path(__file__).parent / "docs" / "imagenette_boxes.csv"


def read_boxes(root, split="val", csv_path=IMAGENETTE_BOXES):
    """ImageNet's human-drawn boxes for the Imagenette images that are ImageNet validation images (the CSV: one
    row per box, `file,wnid,width,height,x0,y0,x1,y1` in the original image's pixels), for a copy of Imagenette
    at `root` (`root/split/<wnid>/<file>`, any size): each box is scaled per axis by the size of the file found
    there. -> [(path, wnid, boxes (M, 4) as x0, y0, x1, y1 in that file's pixels)], the files in order."""
    rows = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            rows.setdefault((row["file"], row["wnid"]), []).append(row)
    found = []
    for (file, wnid), boxes in sorted(rows.items()):
        path = Path(root) / split / wnid / file
        if not path.exists():
            continue
        width, height = Image.open(path).size
        scale = torch.tensor([width / float(boxes[0]["width"]), height / float(boxes[0]["height"])]).repeat(2)
        found.append((path, wnid, torch.tensor([[float(b[k]) for k in ("x0", "y0", "x1", "y1")] for b in boxes])
                      * scale))
    return found
