"""Class evidence, NOAH against GAP: maps that sum to the logits for both heads, the localization score, and
figures that show the image under every map, on shared colour scales, with titles that do not overlap."""
import itertools

import matplotlib
import pytest
import torch
from PIL import Image

import localize
import noah
from helpers import build

matplotlib.use("Agg")

NOT_A_SUM = {("deit", "gap"): "classifies the class token", ("pvt", "gap"): "classifies the class token",
             ("mobilenetv3", "gap"): "pools before a non-linear 1x1 conv"}
CASES = [(name, head) for name in noah.list_models() for head in ("noah", "gap")]


@pytest.mark.parametrize("name, head", [c for c in CASES if (noah.MODELS[c[0]].family, c[1]) not in NOT_A_SUM])
def test_class_evidence_sums_over_positions_to_each_logit(name, head):
    size = 64
    mlp = name.startswith(("mixer", "gmlp"))
    torch.manual_seed(0)
    model = noah.create_model(name, head=head, num_classes=5, img_size=size if mlp else None).train()
    if head == "gap":  # a random but non-zero linear layer (the MLPs' standard head starts at zero)
        torch.nn.init.normal_(model.head.fc.weight, std=0.1)
        torch.nn.init.normal_(model.head.fc.bias, std=0.1)
    images = torch.randn(2, 3, size, size)
    evidence = noah.class_evidence(model, images)
    assert model.training and evidence.shape[:2] == (2, 5)  # run in eval mode, then put back
    with torch.no_grad():
        logits = model.eval()(images)
    torch.testing.assert_close(evidence.sum(dim=(-2, -1)), logits, rtol=1e-4, atol=1e-4)
    if head == "noah":
        per_head = noah.class_evidence(model, images, per_head=True)
        assert per_head.shape == (2, model.head.head_num, *evidence.shape[1:])
        torch.testing.assert_close(per_head.sum(dim=1), evidence)


@pytest.mark.parametrize("name, head", [c for c in CASES if (noah.MODELS[c[0]].family, c[1]) in NOT_A_SUM])
def test_heads_that_are_no_sum_over_positions_are_refused_in_one_line(name, head):
    with torch.device("meta"):
        model = noah.create_model(name, head=head)
    with pytest.raises(ValueError) as error:
        noah.class_evidence(model, torch.randn(1, 3, 64, 64))
    message = str(error.value)
    assert NOT_A_SUM[noah.MODELS[name].family, head] in message and "\n" not in message
    assert "its NOAH head has exact evidence" in message


def test_per_head_evidence_needs_the_noah_head():
    with pytest.raises(ValueError, match="only the NOAH head has heads"):
        noah.class_evidence(build("resnet18", "gap"), torch.randn(1, 3, 64, 64), per_head=True)


def test_evidence_in_box_counts_each_cell_by_the_share_the_box_covers():
    maps = torch.tensor([[[1.0, 3.0], [0.0, -2.0]]])  # a 2 x 2 grid over a 64 x 64 image: cells of 32 x 32
    whole_cell = torch.tensor([[32.0, 0, 64, 32]])  # exactly the top-right cell
    half_cell = torch.tensor([[0.0, 0, 16, 32]])  # the left half of the top-left cell
    assert localize.evidence_in_box(maps, whole_cell, (64, 64)).item() == pytest.approx(3 / 4)  # negatives do not count
    assert localize.evidence_in_box(maps, half_cell, (64, 64)).item() == pytest.approx(0.5 / 4)
    uniform = torch.ones(1, 4, 4)
    assert localize.evidence_in_box(uniform, torch.tensor([[8.0, 8, 40, 24]]), (64, 64)).item() == pytest.approx(
        32 * 16 / 64 ** 2)  # a uniform map scores the box's share of the image


def no_overlaps(figure):
    """No two titles or labels of the figure overlap on the canvas."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    texts = [t for ax in figure.axes for t in (ax.title, ax.yaxis.label) if t.get_text()]
    boxes = [t.get_window_extent(renderer) for t in texts]
    return not [(a.get_text(), b.get_text()) for (a, ba), (b, bb) in itertools.combinations(zip(texts, boxes), 2)
                if ba.overlaps(bb)]


def test_show_pocas_shows_the_image_under_every_map_on_one_scale():
    model = build("mobilenetv2_035", num_classes=5)
    figure = noah.show_pocas(model, torch.randn(3, 96, 96), ["ant", "bee", "cat", "dog", "eel"], top_k=2)
    N = model.head.head_num
    panels = [ax for ax in figure.axes if ax.get_images()]  # the colour bar has none
    assert len(panels) == 2 * (N + 2)
    overlays = [ax for ax in panels if len(ax.get_images()) == 2]  # the image, and a map over it
    assert len(overlays) == 2 * (N + 1)
    assert len({ax.get_images()[1].get_clim() for ax in overlays}) == 1
    assert [ax.get_title() for ax in panels[:N + 2]] == ["image", f"mean of {N} heads"] + [
        f"head {n}" for n in range(1, N + 1)]
    assert "4 x 4 feature grid" not in figure._suptitle.get_text()  # 96 pixels: a 3 x 3 grid
    assert "3 x 3 feature grid (nearest upsampling)" in figure._suptitle.get_text()
    assert no_overlaps(figure)
    matplotlib.pyplot.close(figure)


def test_show_evidence_puts_noah_and_gap_side_by_side():
    noah_model, gap_model = build("resnet18", num_classes=5), build("resnet18", "gap", num_classes=5)
    figure = noah.show_evidence({"NOAH": noah_model, "GAP + FC": gap_model}, torch.randn(3, 96, 96),
                                ["ant", "bee", "cat", "dog", "eel"], top_k=2, upsample="smooth")
    panels = [ax for ax in figure.axes if ax.get_images()]
    assert [ax.get_title() for ax in panels[:4]] == ["image", "NOAH: POCA", "NOAH: evidence", "GAP + FC: CAM"]
    evidence = [ax.get_images()[1] for ax in panels if ax.get_title() in ("", "NOAH: evidence", "GAP + FC: CAM")
                and len(ax.get_images()) == 2 and ax.get_images()[1].get_cmap().name == "RdBu_r"]
    assert len(evidence) == 4 and len({image.get_clim() for image in evidence}) == 1  # one shared scale
    assert all(image.get_interpolation() == "bilinear" for image in evidence)
    assert "every model's maps of NOAH's top classes (NOAH's probabilities)" in figure.get_suptitle()
    assert no_overlaps(figure)
    matplotlib.pyplot.close(figure)


# --- Localization against boxes: ImageNet's for Imagenette, and the scores ------------------------------------------


def csv_rows():
    import csv

    return list(csv.DictReader(open(localize.IMAGENETTE_BOXES)))


def test_the_boxes_csv_holds_imagenettes_imagenet_validation_images_and_their_boxes():
    import data

    rows = csv_rows()
    assert len(rows) == 813 and len({row["file"] for row in rows}) == 500
    assert {row["wnid"] for row in rows} == set(data.IMAGENETTE_CLASSES)
    for row in rows:
        x0, y0, x1, y1, width, height = (int(row[k]) for k in ("x0", "y0", "x1", "y1", "width", "height"))
        assert 0 <= x0 < x1 < width + 1 and 0 <= y0 < y1 < height + 1, row


def some_box_images(root, files=30, size=(100, 80)):
    """Black images at `size` for the first `files` files of the CSV, in root/val/<wnid>/."""
    seen = {}
    for row in csv_rows():
        seen.setdefault(row["file"], row)
    for file, row in list(seen.items())[:files]:
        (root / "val" / row["wnid"]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size).save(root / "val" / row["wnid"] / file)
    return seen


def test_read_boxes_scales_each_box_by_the_size_of_the_image_it_reads(tmp_path):
    seen = some_box_images(tmp_path, files=30, size=(100, 80))
    found = localize.read_boxes(tmp_path)
    assert len(found) == 30
    rows = csv_rows()
    for path, wnid, boxes in found:
        original = [row for row in rows if row["file"] == path.name]
        assert path.parent.name == wnid == seen[path.name]["wnid"] and len(boxes) == len(original)
        W, H = int(original[0]["width"]), int(original[0]["height"])
        expected = [[int(r["x0"]) * 100 / W, int(r["y0"]) * 80 / H, int(r["x1"]) * 100 / W, int(r["y1"]) * 80 / H]
                    for r in original]
        assert torch.allclose(boxes, torch.tensor(expected))
    assert localize.read_boxes(tmp_path, split="train") == []  # nothing there


def padded(box_list):
    """Boxes of several images, (M_i, 4) each -> (B, M, 4), NaN where an image has fewer."""
    out = torch.full((len(box_list), max(len(b) for b in box_list), 4), float("nan"))
    for i, b in enumerate(box_list):
        out[i, : len(b)] = b
    return out


def box_indicator(box, size):
    """1 on the pixels of an image (size x size) whose centres lie in the box."""
    centres = torch.arange(size) + 0.5
    return ((centres[None, :] >= box[0]) & (centres[None, :] <= box[2]) & (centres[:, None] >= box[1])
            & (centres[:, None] <= box[3])).float()


def test_maps_on_each_true_box_score_every_image_and_maps_beside_them_do_not(tmp_path):
    some_box_images(tmp_path, files=20, size=(112, 112))
    found = localize.read_boxes(tmp_path)
    boxes = padded([b for _, _, b in found])
    on_box = torch.stack([box_indicator(b[0], 112) for _, _, b in found])  # each image's first box
    peaked = torch.zeros(len(found), 112, 112)
    for i, (_, _, b) in enumerate(found):
        x, y = int((b[-1, 0] + b[-1, 2]) / 2), int((b[-1, 1] + b[-1, 3]) / 2)  # its last box's centre
        peaked[i, y, x] = 1
    assert localize.pointing_game(peaked, boxes, (112, 112)).all()
    hits = localize.box_hits(on_box, boxes, (112, 112), thresholds=4, grid=(112, 112))
    assert hits[:, 1:].all()  # at thresholds 1/4 to 3/4 the region is the box itself (at 0: the whole image)
    assert localize.evidence_in_box(on_box, boxes, (112, 112)).min() > 0.95  # edge pixels are partly outside
    away = torch.roll(on_box, shifts=(56, 56), dims=(1, 2))  # the same regions, half an image away
    assert localize.box_hits(away, boxes, (112, 112), thresholds=4, grid=(112, 112)).float().mean(0).max() < 0.7
    peaked_away = torch.roll(peaked, shifts=(56, 56), dims=(1, 2))
    assert localize.pointing_game(peaked_away, boxes, (112, 112)).float().mean() < 1


def test_box_hits_takes_the_best_of_every_region_and_joins_diagonal_cells():
    maps = torch.zeros(1, 8, 8)
    maps[0, 0:2, 0:2] = 1.0  # a small region, top left
    maps[0, 5:8, 5:8] = 0.75  # the object's region, bottom right, lower in the map
    truth = torch.tensor([[40.0, 40, 64, 64]])  # (x0, y0, x1, y1): the bottom-right 3 x 3 cells of 8 px
    hits = localize.box_hits(maps, truth, (64, 64), thresholds=10, grid=(8, 8))[0]
    assert hits[1:8].all() and not hits[0] and not hits[8:].any()  # at 0: the whole image; above 0.75: top left
    diagonal = torch.eye(8)[None]  # cells touching at their corners: one region, the whole image's box
    assert localize.box_hits(diagonal, torch.tensor([[0.0, 0, 64, 64]]), (64, 64), thresholds=2, grid=(8, 8)).all()


def test_concentration_is_1_for_uniform_maps_and_0_or_the_grid_for_one_cell():
    uniform = torch.full((2, 4, 4), 1 / 16)
    one_cell = torch.zeros(2, 4, 4)
    one_cell[:, 1, 2] = 1.0
    half_and_half = torch.zeros(4, 4)
    half_and_half[0, 0] = half_and_half[3, 3] = 0.5
    entropy, peak = localize.concentration(torch.stack([uniform[0], one_cell[0], half_and_half]))
    torch.testing.assert_close(entropy, torch.tensor([1.0, 0.0, 0.25]))  # ln 2 / ln 16
    torch.testing.assert_close(peak, torch.tensor([1.0, 16.0, 8.0]))


def test_peak_on_edge_tells_corners_and_the_outer_ring_from_the_inside():
    maps = torch.zeros(5, 3, 4)  # a 3 x 4 grid: one inner row, two inner columns
    for map_, (y, x) in zip(maps, [(0, 0), (2, 3), (0, 1), (1, 3), (1, 2)]):
        map_[y, x] = 1.0
    corner, border = localize.peak_on_edge(maps)
    assert corner.tolist() == [True, True, False, False, False]
    assert border.tolist() == [True, True, True, True, False]
