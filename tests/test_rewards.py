import http.server
import json
import os
import threading

import pytest
import torch
from PIL import Image

import rewards
import common
import sft

SUBJECTS = [{"shape": "star", "color": "red", "texture": "striped", "phase": 0},
            {"shape": "circle", "color": "blue", "texture": "dotted", "phase": 3}]
LEFT, RIGHT = (4, 20, 60, 76), (68, 20, 124, 76)


@pytest.fixture(scope="module")
def embed(tiny_dir):
    return rewards.DinoEmbedder("tiny", "cpu", tiny_dir)


@pytest.fixture(scope="module")
def detector(tiny_dir):
    return rewards.Detector("tiny", "cpu", 0.35, 0.25, tiny_dir)


@pytest.fixture(scope="module")
def hps(tiny_dir):
    return rewards.HPSv3("tiny", "tiny", tiny_dir=tiny_dir)


def refs_for(subjects, seed=0):
    """A reference per subject: its shape in its colour on a 64x64 canvas, with a stripe."""
    from PIL import ImageDraw

    out = []
    for k, s in enumerate(subjects):
        im = Image.new("RGB", (64, 64), "white")
        d = ImageDraw.Draw(im)
        rewards.draw_shape(d, {"star": "diamond"}.get(s["shape"], s["shape"]), (8, 8, 56, 56), s["color"])
        d.line([(8, 20 + 3 * s["phase"] + k + seed), (56, 30 + 3 * s["phase"])], fill="black", width=3)
        out.append(im)
    return out


def paste(refs, boxes, size=(128, 96)):
    im = Image.new("RGB", size, "white")
    for r, b in zip(refs, boxes):
        im.paste(r.resize((b[2] - b[0], b[3] - b[1])), b[:2])
    return im


def fixed_detector(gen_boxes):
    """Stands in for Grounding DINO so the pairing logic is tested alone: generated images get
    `gen_boxes` ({category: [box, ...]}), references get their whole frame."""
    def detect(images, categories, batch_size=None):
        out = []
        for im, cats in zip(images, categories):
            if len(cats) == 1 and im.size == (64, 64):  # a reference
                out.append({cats[0]: [((0, 0, 64, 64), 1.0)]})
            else:
                out.append({c: [(b, 0.9 - 0.1 * j) for j, b in enumerate(gen_boxes.get(c, []))] for c in cats})
        return out
    return detect


def test_pasted_subjects_beat_swapped(embed):
    refs = refs_for(SUBJECTS)
    cats = ["star", "circle"]
    det = fixed_detector({"star": [LEFT], "circle": [RIGHT]})
    right = paste(refs, [LEFT, RIGHT])
    swapped = paste(refs[::-1], [LEFT, RIGHT])
    res = rewards.psr_reward([right, swapped], [refs, refs], [cats, cats], det, embed, "strict")
    assert res["score"][0] > res["score"][1] + 1e-3
    assert all(a > b for a, b in zip(res["per_subject"][0], res["per_subject"][1]))
    assert res["found"] == [[True, True], [True, True]]


def test_official_falls_back_to_whole_image_strict_scores_zero(embed):
    refs = refs_for(SUBJECTS)
    im = paste(refs, [LEFT, RIGHT])
    det = fixed_detector({"star": [LEFT]})  # the circle is not found
    official = rewards.psr_reward([im], [refs], [["star", "circle"]], det, embed, "official")
    strict = rewards.psr_reward([im], [refs], [["star", "circle"]], det, embed, "strict")
    whole = float(embed([im])[0] @ embed([refs[1]])[0])
    assert official["per_subject"][0][1] == pytest.approx(whole, abs=1e-6)
    assert strict["per_subject"][0][1] == 0.0 and strict["found"][0] == [True, False]
    assert strict["boxes"][0] == [list(LEFT), None] and official["boxes"][0] == [list(LEFT), None]
    assert strict["per_subject"][0][0] == pytest.approx(official["per_subject"][0][0], abs=1e-6)
    assert strict["score"][0] == pytest.approx(strict["per_subject"][0][0] / 2)


def test_same_category_subjects_get_distinct_boxes(embed):
    twins = [dict(SUBJECTS[0], shape="circle"), dict(SUBJECTS[1])]
    refs = refs_for(twins)
    im = paste(refs, [LEFT, RIGHT])
    # the detector lists the box holding subject 1 first: in-order (official) pairing gets it wrong
    det = fixed_detector({"circle": [RIGHT, LEFT]})
    strict = rewards.psr_reward([im], [refs], [["circle", "circle"]], det, embed, "strict")
    official = rewards.psr_reward([im], [refs], [["circle", "circle"]], det, embed, "official")
    f_left, f_right = embed([im.crop(LEFT)])[0], embed([im.crop(RIGHT)])[0]
    r0, r1 = embed(refs)
    assert strict["per_subject"][0] == pytest.approx([float(r0 @ f_left), float(r1 @ f_right)], abs=1e-6)
    assert official["per_subject"][0] == pytest.approx([float(r0 @ f_right), float(r1 @ f_left)], abs=1e-6)
    # each subject's box is the one it was scored on (rl.py's --subject_credit places it there)
    assert strict["boxes"][0] == [list(LEFT), list(RIGHT)] and official["boxes"][0] == [list(RIGHT), list(LEFT)]
    assert strict["score"][0] > official["score"][0]


def test_best_assignment_one_to_one():
    import numpy as np

    sim = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert rewards.best_assignment(sim) == [1, 0]      # 0.8 + 0.85 beats 0.9 + 0.1
    assert rewards.best_assignment(np.array([[0.2], [0.7]])) == [None, 0]


def permutation_assignment(sim):
    """best_assignment as it was (a search over every ordering, exact up to 4 subjects): the reference."""
    import itertools

    n_subj, n_box = sim.shape
    best, best_perm = -float("inf"), None
    if n_box >= n_subj:
        for perm in itertools.permutations(range(n_box), n_subj):
            total = sum(sim[i, j] for i, j in enumerate(perm))
            if total > best:
                best, best_perm = total, perm
        return list(best_perm)
    assign = [None] * n_subj
    for subjects in itertools.permutations(range(n_subj), n_box):
        total = sum(sim[s, j] for j, s in enumerate(subjects))
        if total > best:
            best, best_perm = total, subjects
    for j, s in enumerate(best_perm):
        assign[s] = j
    return assign


def test_best_assignment_is_the_permutation_search_up_to_four_subjects_and_scales_to_eight():
    import time

    import numpy as np

    rng = np.random.default_rng(0)
    for n_subj in range(1, 5):
        for n_box in range(0, 3 * n_subj + 1):  # fewer boxes than subjects, as many, and the 3 candidates each
            for _ in range(8):
                sim = rng.uniform(-1, 1, (n_subj, n_box))
                assert rewards.best_assignment(sim) == permutation_assignment(sim), (n_subj, n_box, sim)
    sim = rng.uniform(-1, 1, (6, 7))  # past four subjects, still small enough to search every ordering
    assert rewards.best_assignment(sim) == permutation_assignment(sim)
    sim = rng.uniform(-1, 1, (7, 3))
    assert rewards.best_assignment(sim) == permutation_assignment(sim)
    # 8 subjects of one category, 3 candidates each: a planted optimum (every other pair scores far lower)
    planted = rng.permutation(24)[:8]
    sim = rng.uniform(0, 0.1, (8, 24))
    sim[np.arange(8), planted] += 1.0
    t0 = time.perf_counter()
    assert rewards.best_assignment(sim) == planted.tolist()
    assert time.perf_counter() - t0 < 2.0  # 49k steps; the ordering search would take 3e10


def test_grounding_dino_batching_thresholds_and_boxes(detector):
    refs = refs_for(SUBJECTS)
    images = [paste(refs, [LEFT, RIGHT]), paste(refs[::-1], [LEFT, RIGHT]), refs[0].resize((96, 80))]
    cats = [["star", "circle"], ["star", "circle"], ["star"]]
    batched = detector(images, cats, batch_size=8)
    single = [detector([im], [c])[0] for im, c in zip(images, cats)]
    n_boxes = 0
    for b, s, im, c in zip(batched, single, images, cats):
        assert set(b) == set(c)
        for cat in c:
            assert len(b[cat]) == len(s[cat])
            for (bb, bs), (sb, ss) in zip(b[cat], s[cat]):
                assert bb == pytest.approx(sb, abs=1e-3) and bs == pytest.approx(ss, abs=1e-4)
            for (x1, y1, x2, y2), score in b[cat]:
                n_boxes += 1
                assert x1 < x2 and y1 < y2 and -1 <= x1 and x2 <= im.size[0] + 1 and y2 <= im.size[1] + 1
                assert score > 0.35  # box_threshold; the text threshold removes nothing
    assert n_boxes > 0  # the tiny detector does fire at the paper's thresholds
    strict = rewards.Detector.__new__(rewards.Detector)
    strict.__dict__.update(detector.__dict__, box_threshold=0.999, text_threshold=0.25)
    fewer = strict(images, cats)
    assert sum(len(v) for d in fewer for v in d.values()) < n_boxes
    none = rewards.Detector.__new__(rewards.Detector)
    none.__dict__.update(detector.__dict__, box_threshold=1.0)
    assert all(not v for d in none(images, cats) for v in d.values())


def test_dino_preprocess_matches_definition():
    im = Image.new("RGB", (300, 200), (255, 128, 0))
    x = rewards.dino_preprocess([im])
    assert x.shape == (1, 3, 224, 224)
    want = torch.tensor([(1 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0 - 0.406) / 0.225])
    assert torch.allclose(x[0, :, 112, 112], want, atol=1e-5)
    half = Image.new("RGB", (512, 256), "black")
    half.paste((255, 255, 255), (256, 0, 512, 256))  # right half white; the crop is centred
    y = rewards.dino_preprocess([half])[0, 0]
    assert y[:, :100].max() < 0 and y[:, 124:].min() > 0


def test_hpsv3_loads_strictly_and_reads_the_reward_token(hps, tiny_dir):
    from safetensors.torch import load_file, save_file

    im = Image.new("RGB", (64, 64), (10, 200, 30))
    score = hps([im], ["the star and the circle"])[0]
    inp = rewards.vl_inputs(hps.tok, hps.ip, [im], [hps.text("the star and the circle")], "cpu")
    hidden = hps.hidden(inp)[0]
    pos = (inp["input_ids"][0] == hps.reward_id).nonzero().item()
    assert pos < inp["input_ids"].shape[1] - 1  # "END" follows the token: the last position is not it
    assert score == pytest.approx(hps.head(hidden[pos])[0].item(), abs=1e-6)
    assert score != pytest.approx(hps.head(hidden[-1])[0].item(), abs=1e-6)
    assert hps([im], ["the star and the circle"])[0] != pytest.approx(hps([im], ["a ring"])[0], abs=1e-6)
    # strict loading: a checkpoint missing the head's last layer is refused
    folder = sft.Path(tiny_dir) / "hpsv3"
    state = load_file(folder / "HPSv3.safetensors")
    del state["rm_head.5.bias"]
    broken = folder.parent / "broken-hps.safetensors"
    save_file(state, str(broken))
    with pytest.raises(RuntimeError, match="rm_head|5.bias|Missing"):
        rewards.HPSv3(str(folder / "base"), str(broken), str(folder / "hps_prompt.py"), pixels=56 * 56)


def test_hps_prompt_is_read_not_imported(tmp_path):
    f = tmp_path / "data_collator_qwen.py"
    f.write_text('import does_not_exist\nINSTRUCTION = "judge {text_prompt}"\n'
                 'prompt_with_special_token = "score: <|Reward|> END"\n')
    got = rewards.read_hps_prompt(str(f))
    assert got == {"INSTRUCTION": "judge {text_prompt}", "prompt_with_special_token": "score: <|Reward|> END"}
    f.write_text('INSTRUCTION = "x"\n')
    with pytest.raises(SystemExit, match="not both found"):
        rewards.read_hps_prompt(str(f))


class ChatHandler(http.server.BaseHTTPRequestHandler):
    replies, seen = [], []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatHandler.seen.append(body)
        reply = ChatHandler.replies.pop(0) if ChatHandler.replies else "[Thought]: ok [Score]: 6"
        data = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_endpoint_judge_against_local_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ChatHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ChatHandler.replies = ["[Thought]: a [Score]: 9", "no score at all", "[Thought]: c [Score]: 3"]
        judge = rewards.EndpointJudge(f"http://127.0.0.1:{server.server_port}/v1", "qwen-vl", key="k", concurrency=1)
        ims = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
        res = rewards.judge_scores(judge, ims, ["put the cat on a sofa"] * 3, ["background", "action", "four"],
                                   fallback=-1.0)
        assert res["score"] == [9.0, -1.0, 3.0] and res["unparsed"] == 1
        body = ChatHandler.seen[0]
        assert body["model"] == "qwen-vl" and body["temperature"] == 0.2
        assert "max_tokens" not in body  # no cap that could cut the answer before its score
        content = body["messages"][0]["content"]
        assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert "put the cat on a sofa" in content[1]["text"] and "background" in content[1]["text"]
    finally:
        server.shutdown()


def test_unreachable_endpoint_is_a_clear_error():
    judge = rewards.EndpointJudge("http://127.0.0.1:9/v1", "m", retries=2, timeout=2, backoff=0.01)
    with pytest.raises(RuntimeError, match="judge endpoint http://127.0.0.1:9/v1/chat/completions failed after 2"):
        judge([Image.new("RGB", (8, 8))], ["x"])


def test_local_judge_runs_and_counts_unparsed(tiny_dir):
    judge = rewards.LocalJudge("tiny", "cpu", max_tokens=6, tiny_dir=tiny_dir)
    res = rewards.judge_scores(judge, [Image.new("RGB", (64, 64), "red")] * 2, ["a", "b"], ["attribute", "four"],
                               fallback=5.0)
    assert len(res["answers"]) == 2 and all(isinstance(a, str) for a in res["answers"])
    assert res["score"] == [5.0 if rewards.parse_judge(a) is None else rewards.parse_judge(a) for a in res["answers"]]


def test_batched_equals_one_at_a_time_and_mix_weights(detector, embed, hps):
    images, refs, cats, instr = rewards.benchmark_batch(6, 64)
    mix = rewards.RewardMix(detector, embed, None, hps)
    mix.batch_size = 6
    a = mix(images, refs, cats, instr)
    mix.batch_size = 1
    b = [mix([i], [r], [c], [t]) for i, r, c, t in zip(images, refs, cats, instr)]
    for k in ("psr", "hps", "reward"):
        for x, o in zip(a[k], b):
            assert abs(x - o[k][0]) <= 1e-5 * max(1.0, abs(x)), (k, x, o[k][0])
    assert any(any(f) for f in a["detail"]["psr"]["found"])
    for r, p, h in zip(a["reward"], a["psr"], a["hps"]):
        assert r == pytest.approx(0.4 * p + 0.2 * h / 10, abs=1e-12)


def test_cli_scores_items_and_lists_failures(tmp_path, tiny_dir):
    images, refs, cats, instr = rewards.benchmark_batch(2, 64)
    items = []
    for i, (im, rs, c, t) in enumerate(zip(images, refs, cats, instr)):
        im.save(tmp_path / f"g{i}.png")
        for k, r in enumerate(rs):
            r.save(tmp_path / f"r{i}_{k}.png")
        items.append({"image": f"g{i}.png", "refs": [f"r{i}_{k}.png" for k in range(2)], "categories": c,
                      "instruction": t, "subset": "attribute"})
    items.append(dict(items[0], image="missing.png"))
    (tmp_path / "items.json").write_text(json.dumps(items))
    cfg = common.parse_config(rewards.Config, "rewards", ["--preset", "tiny", "--images", str(tmp_path),
                                                       "--tiny_dir", tiny_dir])
    rewards.main(cfg)
    out = json.loads((tmp_path / "items.scores.json").read_text())
    assert [r["index"] for r in out["items"]] == [0, 1]
    assert out["failed"][0]["index"] == 2 and "missing.png" in out["failed"][0]["reason"]
    assert all(set(r) >= {"reward", "psr", "judge", "hps"} for r in out["items"])


# ----------------------------------------------------------------------------------------------
# The authors' scripts, point by point (github wang-shulei/PSR, eval/; lines of the files there).

# extract_score (eval/semantic-alignment/attribute-alignment.py, lines 22-28): r"\[Score\]:\s*([\d.]+)",
# case-sensitive, float() of the match, no clamp, 5 when nothing matches; main()'s try/except
# (lines 86-93) drops an item whose float() raises.
@pytest.mark.parametrize("text,official,strict", [
    ("[Score]: **8**", 5.0, 8.0),       # "**" is not [\d.]: no match -> 5; strict reads through it
    ("[score]: 7", 5.0, 7.0),           # case-sensitive -> 5; strict ignores case
    ("[Score]: 85", 85.0, 10.0),        # no clamp; strict clamps to 0-10
    ("[Score]: 8.5.", rewards.DROPPED, 8.5),  # float("8.5.") raises -> dropped
    ("[Thought]: fine [Score]:7.5", 7.5, 7.5),
    ("[Thought]: x [Score] ：9", 5.0, 9.0),  # full-width colon, space before it
    ("[Thought]: no number here [Score]: high", 5.0, None),
    ("", 5.0, None),
])
def test_judge_parsing(text, official, strict):
    assert rewards.parse_judge_official(text) == official
    assert rewards.parse_judge(text) == strict


AUTHORS_SCORER = """from openai import OpenAI
client = OpenAI(base_url="http://localhost:1/v1", api_key="psr")
raise SystemExit("this file was executed")
class QwenVLScorer:
    def __init__(self):
        self.task='''
        KIND rules
        [description]: {}
        [Score]:
        '''
"""


def test_judge_templates_from_a_checkout(tmp_path):
    # the authors' layout: eval/semantic-alignment/<name>-alignment.py with the prompt in self.task
    # (attribute-alignment.py lines 33-46), filled by self.task.format(p) (line 52)
    folder = tmp_path / "PSR" / "eval" / "semantic-alignment"
    folder.mkdir(parents=True)
    for name in ("attribute", "four"):
        (folder / f"{name}-alignment.py").write_text(AUTHORS_SCORER.replace("KIND", name.upper()))
    t = rewards.load_judge_templates(tmp_path / "PSR")  # a folder above them; their code never runs
    assert rewards.judge_prompt("dog in hat", "Attribute", t) == (
        "\n        ATTRIBUTE rules\n        [description]: dog in hat\n        [Score]:\n        ")
    assert "FOUR rules" in rewards.judge_prompt("dog in hat", "Three", t)   # the all-content template
    assert "FOUR rules" in rewards.judge_prompt("dog in hat", "Action", t)  # no action file here
    assert "dog in hat" in rewards.judge_prompt("dog in hat", "action")      # built-in wording
    (tmp_path / "none").mkdir()
    with pytest.raises(SystemExit, match="alignment.py"):
        rewards.load_judge_templates(tmp_path / "none")


class HandMadeDino:
    """Grounding DINO's outputs written by hand (logits per query and token, boxes in centre
    format), so the box-choice rule is tested on its own; records the captions it was given."""
    dtype = torch.float32

    def __init__(self, probs, boxes):
        self.probs, self.boxes, self.captions = torch.tensor(probs), torch.tensor(boxes), []

    def __call__(self, input_ids, pixel_values, **kw):
        from types import SimpleNamespace

        self.captions += [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in input_ids]
        b, t = input_ids.shape
        p = self.probs[None, :, :1].expand(b, -1, t).clone()
        p[:, :, : self.probs.shape[1]] = self.probs[None, :, : t]
        return SimpleNamespace(logits=torch.logit(p.clamp(1e-6, 1 - 1e-6)), pred_boxes=self.boxes[None].expand(b, -1, -1))


def test_box_choice_is_query_order_and_captions_are_per_subject(detector):
    # groundingdino/util/inference.py predict(): a query survives when logits.max(dim=1) > box_threshold,
    # in query order; text_threshold only builds phrases. eval-2-subject-sc.py segment_pil takes
    # input_boxes[0] of the survivors, after boxes * [w, h, w, h] and cxcywh -> xyxy (lines 118-121).
    probs = [[0.30, 0.20, 0.10],   # query 0: best 0.30 < 0.35, dropped
             [0.36, 0.10, 0.10],   # query 1: best 0.36 kept, though under the text threshold on the words
             [0.10, 0.95, 0.10]]   # query 2: the highest score, but second in query order
    boxes = [[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 0.4], [0.75, 0.25, 0.3, 0.5]]
    det = rewards.Detector.__new__(rewards.Detector)
    det.__dict__.update(detector.__dict__, box_threshold=0.35, text_threshold=0.25)
    det.model = HandMadeDino(probs, boxes)
    det.model.tokenizer = detector.processor.tokenizer
    im = Image.new("RGB", (100, 80), "white")
    out = det([im], [["Dog", "cat"]])[0]
    assert sorted(det.model.captions) == ["cat.", "dog."]  # one call per subject, its category alone
    assert [b for b, _ in out["dog"]] == [pytest.approx((0.0, 24.0, 50.0, 56.0)), pytest.approx((60.0, 0.0, 90.0, 40.0))]
    assert [s for _, s in out["dog"]] == [pytest.approx(0.36, abs=1e-5), pytest.approx(0.95, abs=1e-5)]


def test_official_box_index_for_duplicate_categories():
    # eval-2-subject-sc.py __call__: category1 == category2 -> segment_pil_samecategory with idx 0 and 1;
    # eval-3/eval-4-subject-sc.py call segment_pil (box 0) for every subject
    assert [rewards.official_box_index(["dog", "dog"], k) for k in range(2)] == [0, 1]
    assert [rewards.official_box_index(["dog", "cat"], k) for k in range(2)] == [0, 0]
    assert [rewards.official_box_index(["dog", "dog", "cat"], k) for k in range(3)] == [0, 0, 0]
    assert [rewards.official_box_index(["dog"] * 4, k) for k in range(4)] == [0, 0, 0, 0]


def test_three_subjects_of_one_category_share_box_zero_officially(embed):
    twins = [dict(SUBJECTS[0], shape="circle"), dict(SUBJECTS[1]), dict(SUBJECTS[1], phase=6)]
    refs = refs_for(twins)
    im = paste(refs[:2], [LEFT, RIGHT])
    det = fixed_detector({"circle": [RIGHT, LEFT]})
    official = rewards.psr_reward([im], [refs], [["circle"] * 3], det, embed, "official")
    f_right = embed([im.crop(RIGHT)])[0]
    assert official["per_subject"][0] == pytest.approx([float(r @ f_right) for r in embed(refs)], abs=1e-6)


def test_crop_rounding_is_the_authors():
    # eval-2-subject-sc.py segment_pil lines 122-127: x1 = int(x1) ... result[y1:y2, x1:x2] (numpy slice)
    assert rewards.crop_box((3.9, -0.5, 10.99, 8.2), (20, 20)) == (3, 0, 10, 8)   # int() truncates toward 0
    assert rewards.crop_box((-3.2, 0, 20, 5), (20, 20)) == (17, 0, 20, 5)         # -3 counts from the far edge
    assert rewards.crop_box((5, 5, 5.9, 9), (20, 20)) is None                    # empty: whole-image fallback
    # torchvision Resize(256): the long side is int(256 * long / short); CenterCrop: int(round((n - 224) / 2))
    assert rewards.resize_plan(30, 70) == (256, 597, 16, 186)   # 256*70/30 = 597.3; (597-224)/2 = 186.5 -> 186
    assert rewards.resize_plan(70, 30) == (597, 256, 186, 16)
    assert rewards.resize_plan(256, 300) == (256, 300, 16, 38)


def test_crop_path_is_one_for_rl_and_bench():
    # rl.py's GPU path (kernels.reward_ops, here its torch reference) and bench's PIL path give one DINO input
    import numpy as np
    from kernels import reward_ops as R

    arr = np.random.default_rng(0).integers(0, 256, (1, 90, 700, 3), dtype=np.uint8)
    im = Image.fromarray(arr[0])
    boxes = [(3.2, 4.7, 50.1, 60.0), (5, 2, 600, 88), (-3.5, 0, 40, 40), (0, 0, 700, 90)]  # up, down (antialiased), wrapped
    pil = rewards.dino_preprocess([im] * 4, boxes)
    fast = R.crop_resize_normalize_reference(torch.from_numpy(arr), torch.zeros(4, dtype=torch.long),
                                             rewards.int_boxes(boxes, [im.size] * 4))
    assert (pil - fast).abs().max().item() < 1e-3


def test_hpsv3_text_decoder_gets_sequential_positions(hps):
    # HPSv3's reward-model forward under transformers 4.45 calls the decoder without position ids:
    # positions 0..L-1 in all three rope sections, not Qwen2-VL's multimodal (t, h, w) indices
    im = Image.new("RGB", (64, 64), (10, 200, 30))
    inp = rewards.vl_inputs(hps.tok, hps.ip, [im], [hps.text("a star")], "cpu")
    at = inp["input_ids"][0] == hps.reward_id
    n = inp["input_ids"].shape[1]
    with torch.no_grad():
        plain = hps.model.model(**inp, position_ids=torch.arange(n).view(1, 1, n).expand(3, 1, n)).last_hidden_state
        mrope = hps.model.model(**inp).last_hidden_state
    score = hps([im], ["a star"])[0]
    assert score == pytest.approx(hps.head(plain[0][at].float())[0, 0].item(), abs=1e-6)
    assert score != pytest.approx(hps.head(mrope[0][at].float())[0, 0].item(), abs=1e-6)
    assert all(p.dtype == torch.float32 for p in hps.head.parameters())


def test_mix_counts_unparsed_judge_answers(detector, embed):
    class Judge:
        def __call__(self, images, prompts, batch_size=8):
            return ["[Score]: 7", "no number"][: len(images)]

    images, refs, cats, instr = rewards.benchmark_batch(2, 64)
    res = rewards.RewardMix(detector, embed, Judge(), None)(images, refs, cats, instr)
    assert res["judge"] == [7.0, 0.0] and res["judge_unparsed"] == 1


def test_cli_checks_out_first_and_writes_scores_as_it_goes(tmp_path, tiny_dir, monkeypatch):
    # before: scores were written only at the end, and an unwritable --out lost all of them
    images, refs, cats, instr = rewards.benchmark_batch(3, 64)
    items = []
    for i, (im, rs, c, t) in enumerate(zip(images, refs, cats, instr)):
        im.save(tmp_path / f"g{i}.png")
        for k, r in enumerate(rs):
            r.save(tmp_path / f"r{i}_{k}.png")
        items.append({"image": f"g{i}.png", "refs": [f"r{i}_{k}.png" for k in range(2)], "categories": c,
                      "instruction": t})
    (tmp_path / "items.json").write_text(json.dumps(items))
    args = ["--preset", "tiny", "--images", str(tmp_path), "--tiny_dir", tiny_dir, "--reward_batch", "2"]

    def boom(*a, **k):
        raise AssertionError("the reward models were loaded before --out was checked")
    monkeypatch.setattr(rewards, "build_reward_mix", boom)
    # under torchrun every rank would score every item into one rows file: refused before anything loads
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="one process: start it with python, not torchrun"):
        rewards.main(common.parse_config(rewards.Config, "rewards", args))
    monkeypatch.delenv("WORLD_SIZE")
    (tmp_path / "adir").mkdir()
    with pytest.raises(SystemExit, match="--out .*adir is a folder"):
        rewards.main(common.parse_config(rewards.Config, "rewards", args + ["--out", str(tmp_path / "adir")]))
    with pytest.raises(SystemExit, match="cannot write to .*items.json"):  # its folder would be a file
        rewards.main(common.parse_config(rewards.Config, "rewards", args + ["--out", str(tmp_path / "items.json" / "s.json")]))
    monkeypatch.undo()
    # rows are appended batch by batch: a failure at the final write keeps them
    real_write = rewards.write_json

    def full_disk(path, obj):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(rewards, "write_json", full_disk)
    with pytest.raises(OSError):
        rewards.main(common.parse_config(rewards.Config, "rewards", args))
    rows = common.read_jsonl(tmp_path / "items.scores.json.rows.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 2] and all("reward" in r for r in rows)
    monkeypatch.setattr(rewards, "write_json", real_write)
