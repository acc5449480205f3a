"""The shapes world's perception (world/perception.py) and its hooks in rewards.py: fast checks on
hand-made cases plus one tiny end-to-end build (a few training steps) through the real loaders."""

import json

import numpy as np
import pytest
import torch

import rewards
from world import perception as wp

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# Segmenter as detector: components -> boxes, on hand-made probabilities.

LABELS = ["background", "circle", "square"]


def fake_segmenter(box_threshold=0.35, min_area=0.004):
    seg = wp.SegmenterDetector.__new__(wp.SegmenterDetector)
    seg.labels = {n: i for i, n in enumerate(LABELS)}
    seg.box_threshold, seg.min_area = box_threshold, min_area
    return seg


def one_hot(label_map, confidence=0.9):
    """[H, W] label ids -> [C, H, W] probabilities: `confidence` on the label, the rest spread."""
    c = len(LABELS)
    prob = torch.full((c, *label_map.shape), (1 - confidence) / (c - 1))
    prob.scatter_(0, torch.as_tensor(label_map)[None].long(), confidence)
    return prob


def test_components_become_boxes_best_first_and_specks_are_dropped():
    m = np.zeros((32, 32), np.int64)
    m[2:6, 3:10] = 1       # a circle component: x 3..9, y 2..5 -> box (3, 2, 10, 6)
    m[20:30, 20:25] = 1    # a second, larger circle component
    m[15, 15] = 2          # one square pixel: under min_area (4 pixels at 32x32)
    prob = one_hot(m)
    prob[1, 20:30, 20:25] = 0.95  # the second circle is more confident: it comes first
    found = fake_segmenter().boxes(prob, ["Circle", "square", "dog"])
    assert set(found) == {"circle", "square", "dog"}
    assert [b for b, _ in found["circle"]] == [(20.0, 20.0, 25.0, 30.0), (3.0, 2.0, 10.0, 6.0)]
    assert found["circle"][0][1] == pytest.approx(0.95) and found["circle"][1][1] == pytest.approx(0.9)
    assert found["square"] == [] and found["dog"] == []


def test_diagonal_pixels_are_one_component_and_low_scores_are_dropped():
    comps = wp.connected_components(np.eye(5, dtype=bool))
    assert len(comps) == 1 and len(comps[0][0]) == 5
    m = np.zeros((32, 32), np.int64)
    m[4:10, 4:10] = 2
    assert fake_segmenter(box_threshold=0.95).boxes(one_hot(m, 0.9), ["square"]) == {"square": []}


# ----------------------------------------------------------------------------------------------
# The judge: phrases and checks, by hand.

@pytest.mark.parametrize("text,want", [
    ("Put the diamond below the star.",
     {"shapes": ["diamond", "star"], "background": None, "relation": ("diamond", "below", "star"),
      "attribute": None, "action": None}),
    ("On a blue background, show the star, the ring and the cross; give the ring a small hat.",
     {"shapes": ["star", "ring", "cross"], "background": "blue", "relation": None, "attribute": ("ring", "hat"),
      "action": None}),
    ("Show the star and the triangle side by side, with the triangle upside down.",
     {"shapes": ["star", "triangle"], "background": None, "relation": None, "attribute": None,
      "action": ("triangle", "upside down")}),
    ("Place the square and the hexagon on a purple background.",  # not one of the world's backgrounds
     {"shapes": ["square", "hexagon"], "background": None, "relation": None, "attribute": None, "action": None}),
    ("A string of starts.", {"shapes": [], "background": None, "relation": None, "attribute": None, "action": None}),
])
def test_parse_instruction(text, want):
    assert wp.parse_instruction(text) == want


def test_instruction_is_read_from_the_judge_template():
    prompt = rewards.judge_prompt("Put the circle above the square.", "position")
    assert wp.instruction_of(prompt) == "Put the circle above the square."
    assert wp.parse_instruction(wp.instruction_of(prompt))["relation"] == ("circle", "above", "square")


@pytest.mark.parametrize("relation,a,b,want", [
    ("left", (0, 10, 8, 18), (20, 10, 28, 18), True), ("right", (0, 10, 8, 18), (20, 10, 28, 18), False),
    ("above", (10, 0, 18, 8), (10, 20, 18, 28), True), ("below", (10, 0, 18, 8), (10, 20, 18, 28), False),
    ("left", (0, 0, 8, 8), (4, 20, 12, 28), False),  # mostly below, not left
])
def test_relation_holds(relation, a, b, want):
    assert wp.relation_holds(relation, a, b) is want


class OracleSegmenter:
    """Stands in for the SegFormer: probabilities read off the rendered label map of each image."""

    def __init__(self, label_maps):
        self.maps = label_maps
        self.labels = {n: i for i, n in enumerate(wp.SEG_LABELS)}
        self.box_threshold, self.min_area = 0.35, 0.004

    def probs(self, images, batch_size=8):
        out = []
        for im in images:
            lab = torch.as_tensor(self.maps[id(im)]).long()
            out.append(torch.nn.functional.one_hot(lab, len(wp.SEG_LABELS)).permute(2, 0, 1).float())
        return out

    boxes = wp.SegmenterDetector.boxes


class FixedClassifier(torch.nn.Module):
    """Every crop gets the same crop-label probabilities."""

    def __init__(self, probs):
        super().__init__()
        from transformers import ViTConfig

        self.config = ViTConfig(num_labels=len(wp.CROP_LABELS), id2label=dict(enumerate(wp.CROP_LABELS)))
        self.logit = torch.logit(torch.tensor([probs[n] for n in wp.CROP_LABELS]).clamp(1e-4, 1 - 1e-4))

    def forward(self, pixel_values):
        return type("Out", (), {"logits": self.logit.expand(len(pixel_values), -1)})()


SQUARE = {"shape": "square", "color": "red", "texture": "plain", "phase": 0}
CIRCLE = {"shape": "circle", "color": "blue", "texture": "dotted", "phase": 0}


def oracle_judge(scenes, crop_probs=None):
    images, maps = [], {}
    for sc in scenes:
        im, lab = wp.render_scene(sc)
        images.append(im)
        maps[id(im)] = lab
    crop_probs = crop_probs or {n: 0.0 for n in wp.CROP_LABELS}
    judge = wp.ShapesJudge.from_parts(wp.judge_spec(), OracleSegmenter(maps), FixedClassifier(crop_probs))
    return judge, images


def pair(bg="white", left=SQUARE, right=CIRCLE, **kw):
    return {"size": 32, "background": bg,
            "items": [wp.item(left, 9.6, 16, 5.4, **kw), wp.item(right, 22.4, 16, 5.4)]}


def test_judge_scores_are_the_share_of_checks_passed():
    judge, images = oracle_judge([pair("white"), pair("blue")])
    white, blue = images
    cases = [
        # (image, instruction, score): worked out by hand from the checks listed
        (white, "Put the square to the left of the circle.", 10.0),    # 2 subjects once + relation
        (white, "Put the square to the right of the circle.", 6.7),    # relation fails: 2 of 3
        (white, "Put the star to the left of the circle.", 3.3),       # no star, no relation: 1 of 3
        (blue, "Place the square and the circle on a blue background.", 10.0),  # 3 of 3
        (white, "Place the square and the circle on a blue background.", 6.7),  # wrong background: 2 of 3
        (white, "Show the square, the circle, the ring and the cross together in one picture.", 5.0),  # 2 of 4
    ]
    answers = judge([c[0] for c in cases], [rewards.judge_prompt(c[1], "generic") for c in cases])
    for (_, text, want), answer in zip(cases, answers):
        assert answer.startswith("[Thought]: ")
        assert rewards.parse_judge(answer) == want, (text, answer)
    assert "background asked blue, seen white" in answers[4]


def test_judge_attribute_and_action_checks():
    hat = {"hat": 0.9, "outline": 0.1}
    judge, images = oracle_judge([pair(attribute="hat")], hat)
    text = "Show the square and the circle together; give the square a small hat."
    # 2 subjects + "the square has a hat" pass, but the fixed classifier gives the circle a hat too: 3 of 4
    assert rewards.parse_judge(judge(images, [text])[0]) == 7.5
    # an action a symmetric shape hides gets credit: a circle upside down looks the same (3 of 3)
    judge, images = oracle_judge([pair()])
    assert rewards.parse_judge(judge(images, ["Show the square and the circle, with the circle upside down."])[0]) == 10
    # a square turned 30 degrees can be seen: asked for it, the upright square fails (2 of 3) and
    # the turned one passes; a triangle upside down is read as upside down, not as tilted
    judge, images = oracle_judge([pair(), pair(angle=30.0), pair(left={**SQUARE, "shape": "triangle"}, angle=180.0)])
    upright, turned, triangle = images
    tilted = "Show the square and the circle, with the square tilted to one side."
    upside = "Show the triangle and the circle, with the triangle upside down."
    answers = judge([upright, turned, triangle, triangle],
                    [tilted, tilted, upside, upside.replace("upside down", "tilted to one side")])
    assert [rewards.parse_judge(a) for a in answers] == [6.7, 10, 10, 6.7]


def test_hidden_attribute_on_a_black_background_gets_credit():
    judge, images = oracle_judge([pair("black", attribute="hat")])
    answer = judge(images, ["On a black background, show the square and the circle; give the square a small hat."])[0]
    assert rewards.parse_judge(answer) == 10 and "hidden by the background" in answer


# ----------------------------------------------------------------------------------------------
# Rendering, and the whole path through rewards.py's loaders with a few training steps.

def test_rendered_scene_matches_draw_sample_and_labels_cover_the_subjects():
    (sample, scene) = wp.sample_scene(3, 0)
    target, meta = sample[4], sample[6]
    image, labels = wp.render_scene(scene)
    diff = np.abs(np.asarray(image, dtype=int) - np.asarray(target, dtype=int)).sum(-1) > 0
    assert diff.mean() < 0.02  # boxes are rounded to 0.1 px in meta: a few edge pixels may differ
    fixed = wp.target_labels(target, scene)
    assert ((fixed > 0) == (np.asarray(target) != np.array(wp.BACKGROUNDS[meta["background"]])).any(-1)).all()
    for s, box in zip(sample[3], meta["boxes"]):
        tight = wp.mask_box(fixed == wp.SEG_LABELS.index(s["shape"]))
        assert wp.iou(tight, wp.clip_box(box, 32)) > 0.5


def test_roc_auc_by_hand():
    assert wp.roc_auc([3, 4], [1, 2]) == 1.0
    assert wp.roc_auc([1], [1]) == 0.5
    assert wp.roc_auc([2, 0], [1]) == 0.5


DEGRADE_CALLS = []


def recording_degrade(x):
    """A stand-in for the VAE round trip: records what it is given, darkens a little."""
    DEGRADE_CALLS.append(tuple(x.shape))
    return x * 0.9


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    det = wp.train_detector(root / "detector", steps=3, batch_size=8, n_samples=8, degrade=recording_degrade)
    judge = wp.build_judge(root / "judge", det, steps=2, n_scenes=6)
    return det, judge


def test_degrade_hook_sees_part_of_each_batch(tiny_world):
    assert DEGRADE_CALLS and all(len(s) == 4 and s[1:] == (3, 32, 32) and 1 <= s[0] < 8 for s in DEGRADE_CALLS)


def test_embedder_trains_and_loads_as_dino(tiny_world, tmp_path):
    calls = len(DEGRADE_CALLS)
    path = wp.train_embedder(tmp_path / "embedder", steps=2, detector_dir=tiny_world[0], degrade=recording_degrade,
                             n_ids=4, n_samples=6)
    assert len(DEGRADE_CALLS) > calls  # the degraded copies of the targets
    embed = rewards.DinoEmbedder(path, "cpu")
    (sample, _), = wp.held_out(1)
    feats = embed.regions([(sample[4], wp.clip_box(b, 32)) for b in sample[6]["boxes"]] + [(sample[5][0], None)])
    assert feats.shape == (len(sample[3]) + 1, embed.model.config.hidden_size)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(len(feats)), atol=1e-5)


def test_segformer_folder_is_a_detector_in_rewards(tiny_world):
    det_dir, _ = tiny_world
    det = rewards.Detector(det_dir, "cpu", box_threshold=0.0)
    assert det.program is not None and det.program.labels["star"] == wp.SEG_LABELS.index("star")
    (sample, _), = wp.held_out(1)
    out = det([sample[4], sample[5][0]], [["Star", "circle"], ["ring"]])
    assert set(out[0]) == {"star", "circle"} and set(out[1]) == {"ring"}
    for per_image in out:
        for found in per_image.values():
            assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)
            for box, score in found:
                assert len(box) == 4 and 0 <= box[0] < box[2] <= 32 and 0 <= box[1] < box[3] <= 32
                assert 0.0 <= score <= 1.0


def test_local_judge_loads_a_program_judge_folder(tiny_world):
    _, judge_dir = tiny_world
    spec = json.loads((wp.Path(judge_dir) / "judge.json").read_text())
    assert spec["program"] == "world.perception:ShapesJudge" and not wp.Path(spec["detector"]).is_absolute()
    judge = rewards.LocalJudge(judge_dir, "cpu")
    assert isinstance(judge.program, wp.ShapesJudge)
    (sample, _), = wp.held_out(1)
    res = rewards.judge_scores(judge, [sample[4]], [sample[2]], [sample[1]])
    assert res["unparsed"] == 0 and 0 <= res["score"][0] <= 10
    assert res["answers"][0].startswith("[Thought]:")


def test_reward_mix_without_hps(tiny_world, tiny_dir):
    cfg = rewards.Config(detector=tiny_world[0], dino="tiny", judge=tiny_world[1], hps_base="", tiny_dir=tiny_dir)
    mix = rewards.build_reward_mix(cfg)
    assert mix.hps is None and isinstance(mix.judge.program, wp.ShapesJudge)
    (sample, _), = wp.held_out(1)
    res = mix([sample[4]], [sample[5]], [[s["shape"] for s in sample[3]]], [sample[2]], [sample[1]])
    assert "hps" not in res and len(res["reward"]) == 1
