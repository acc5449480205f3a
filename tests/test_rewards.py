import http.server
import json
import threading

import pytest
import torch
from PIL import Image

import rewards
import common
import sft
from make_data import draw_reference

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
    import random

    return [draw_reference(s, 64, random.Random(seed + k)) for k, s in enumerate(subjects)]


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
    assert strict["score"][0] > official["score"][0]


def test_best_assignment_one_to_one():
    import numpy as np

    sim = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert rewards.best_assignment(sim) == [1, 0]      # 0.8 + 0.85 beats 0.9 + 0.1
    assert rewards.best_assignment(np.array([[0.2], [0.7]])) == [None, 0]


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
                assert score > 0.25
            assert [sc for _, sc in b[cat]] == sorted([sc for _, sc in b[cat]], reverse=True)
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
    hidden = hps.model.model(**inp).last_hidden_state[0]
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


@pytest.mark.parametrize("text,want", [
    ("[Thought]: both subjects are there.\n[Score]: 8", 8.0),
    ("[Thought]: fine [Score]:7.5", 7.5),
    ("[thought] x [score] : **9**", 9.0),
    ("[Score]: 14", 10.0),
    ("[Thought]: no number here [Score]: high", None),
    ("I would give it 6 out of 10", None),
    ("", None),
])
def test_judge_parsing(text, want):
    assert rewards.parse_judge(text) == want


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
        content = body["messages"][0]["content"]
        assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert "put the cat on a sofa" in content[1]["text"] and "background" in content[1]["text"]
    finally:
        server.shutdown()


def test_unreachable_endpoint_is_a_clear_error():
    judge = rewards.EndpointJudge("http://127.0.0.1:9/v1", "m", retries=2, timeout=2, backoff=0.01)
    with pytest.raises(RuntimeError, match="judge endpoint http://127.0.0.1:9/v1/chat/completions failed after 2"):
        judge([Image.new("RGB", (8, 8))], ["x"])


def test_judge_templates_from_a_checkout(tmp_path):
    (tmp_path / "attribute.txt").write_text("ATTR {instruction} -> [Score]")
    (tmp_path / "prompts.py").write_text('GENERIC_PROMPT = "GEN {prompt}"\n')
    t = rewards.load_judge_templates(tmp_path)
    assert rewards.judge_prompt("dog in hat", "attribute", t) == "ATTR dog in hat -> [Score]"
    assert rewards.judge_prompt("dog in hat", "three", t) == "GEN dog in hat"
    assert "dog in hat" in rewards.judge_prompt("dog in hat", "action")


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
