import http.server
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import make_data
import common
import sft

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(*args):
    return common.parse_config(make_data.Config, "make_data", list(args))


def test_category_pool_is_objects365():
    lines = [ln for ln in (ROOT / "configs" / "objects365.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    names = [ln.split("#")[0].strip() for ln in lines]
    assert len(names) == 365 and len(set(names)) == 365
    pool = make_data.load_categories("configs/objects365.txt")
    assert "person" in pool and "cabinet" in pool and all(p == p.lower() for p in pool)
    # "Cutting/chopping Board": the first alternative borrows the head noun, not "cutting" alone
    assert "cutting board" in pool and "cutting" not in pool and len(pool) == 365
    assert make_data.category_name("Washing Machine/Drying Machine") == "washing machine"
    assert make_data.category_name("Monitor/TV") == "monitor"
    # spelled right for the detector and the prompts; the dataset's own spelling kept in a comment
    assert {"monitor", "noodles", "basket", "balloon", "camel", "butterfly", "mushroom"} <= set(pool)
    assert not {"moniter", "noddles", "bakset", "ballon", "campel", "buttefly", "mushroon"} & set(pool)
    assert any("Moniter/TV" in ln for ln in lines)


def models_cfg(tiny_dir, out, *extra):
    return cfg_for("--preset", "tiny-models", "--out", str(out), "--tiny_dir", tiny_dir, "--max_draws", "12", *extra)


def test_tiny_models_preset_end_to_end_and_sft_trains(tmp_path, tiny_dir):
    out = tmp_path / "tm"
    make_data.main(models_cfg(tiny_dir, out, "--n_samples", "3"))
    samples = common.load_samples(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == len(samples) == manifest["made_this_run"] == 3  # drops are replaced
    assert set(manifest["seconds_per_item"]) == set(make_data.PHASES)
    assert manifest["items_this_run"]["prompts"] == 3 + sum(manifest["dropped"].values())
    detected = make_data.phase_rows(out, "detect")
    for s in samples:
        i = int(s["id"].rsplit("-", 1)[1])
        assert s["meta"]["source"] == "models" and len(s["meta"]["dino"]) == len(s["subjects"])
        assert all((out / sub["ref"]).exists() for sub in s["subjects"]) and (out / s["target"]).exists()
        cats = [x["category"] for x in s["subjects"]]
        looks = make_data.appearance_words([s["meta"]["scene_prompt"]] + s["meta"]["subject_prompts"], cats)
        assert make_data.check_instruction(s["instruction"], cats, looks,
                                           make_data.editor_instruction(s["meta"]["edit"]) if s["meta"]["edit"] else "")[1] == "ok"
        for k, sub in enumerate(s["subjects"]):  # each reference at its crop's aspect ratio, not stretched
            with Image.open(out / sub["ref"]) as im:
                x1, y1, x2, y2 = detected[i]["boxes"][k]
                assert im.size == make_data.ref_input_size(*make_data.crop_dims((x1, y1, x2, y2), (64, 64)), 64)
    assert not list((out / "work" / "scene").glob("*.png"))  # work images go once a sample is written
    assert (out / "cache" / "manifest.json").exists()
    # the cache's bytes per sample, said at the start from the shapes, are what the shards hold
    # (references keep their crop's aspect ratio, so theirs is only about the target's each)
    measured, predicted = manifest["cache_bytes_per_sample"], manifest["cache_bytes_predicted"]
    assert measured["samples"] == 3 and all(measured[k] == predicted[k] for k in ("target", "t5", "clip"))
    refs = sum(len(s["subjects"]) for s in samples) / 3
    assert abs(measured["refs"] - refs * predicted["target"]) <= 0.3 * refs * predicted["target"]
    assert measured["t5"] == 16 * 32 * 4  # max_text_len 16 x the tiny T5's width x fp32
    umask = os.umask(0)
    os.umask(umask)
    for f in (out / "cache").iterdir():  # shards too: a normal file's mode, like every other file
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    cfg = common.parse_config(sft.Config, "sft", ["--preset", "tiny-models", "--data", str(out), "--out",
                                                  str(tmp_path / "sft"), "--tiny_dir", tiny_dir, "--steps", "3"])
    sft.train(cfg)
    assert (tmp_path / "sft" / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_filters_drop_and_count_each_reason(tmp_path, tiny_dir):
    size = (64, 64)
    det = {"dog": [((0, 0, 30, 30), 0.9)], "cat": [((0, 0, 30, 30), 0.9), ((30, 30, 60, 60), 0.8)], "cup": [],
           "cow": [((0, 0, 30, 30), 0.9), ((1, 1, 30, 31), 0.7)]}
    assert make_data.filter_boxes(det, ["dog", "cup"], size, True, 0.02) == (None, "not_found")
    assert make_data.filter_boxes(det, ["dog", "cat"], size, True, 0.02) == (None, "found_multiple")
    assert make_data.filter_boxes(det, ["dog", "cat"], size, False, 0.02)[1] == "ok"
    assert make_data.filter_boxes(det, ["dog"], size, True, 0.5) == (None, "box_too_small")
    # one cow seen twice (IoU 0.9) is one cow after NMS, so "exactly once" holds
    assert make_data.filter_boxes(det, ["dog", "cow"], size, True, 0.02) == ([[0, 0, 30, 30], [0, 0, 30, 30]], "ok")
    assert make_data.filter_boxes(det, ["cow"], size, True, 0.02, nms_iou=0.95) == (None, "found_multiple")
    # two categories on one object (the same box) drop; boxes that merely touch stay
    assert make_data.filter_boxes(det, ["dog", "cow"], size, True, 0.02, max_pair_iou=0.7) == (None, "boxes_overlap")
    det2 = {"dog": [((0, 0, 30, 30), 0.9)], "cat": [((20, 20, 50, 50), 0.9)]}  # IoU 100/1700
    assert make_data.filter_boxes(det2, ["dog", "cat"], size, True, 0.02, max_pair_iou=100 / 1700)[1] == "ok"
    assert make_data.filter_boxes(det2, ["dog", "cat"], size, True, 0.02, max_pair_iou=100 / 1700 - 1e-9) == (
        None, "boxes_overlap")
    # the reference-similarity filter, through the real pipeline: no reference can reach 1.01; the run
    # stops after n_samples * max_draws ids
    out = tmp_path / "d"
    with pytest.raises(SystemExit, match="no sample survived"):
        make_data.main(cfg_for("--preset", "tiny-models", "--out", str(out), "--tiny_dir", tiny_dir, "--n_samples", "2",
                               "--max_draws", "4", "--min_dino", "1.01"))
    drops = json.loads((out / "manifest.json").read_text())["dropped"]
    assert drops.get("ref_dissimilar", 0) > 0 and sum(drops.values()) == 8


S_CATCAR = "A photo of a fluffy striped cat and a shiny red car together in a park."
S_DOGCAT = "A dog and a cat curled up together on a sofa."
S_DOGCHAIR = "A dog with a shaggy red coat sitting next to a small wooden chair."
S_DOGCUP = "A golden retriever dog and a blue cup on a kitchen table."
S_CARAPPLE = "A cart full of apples beside a car on a street."
S_GLASS = "A crystal wine glass next to a plush stuffed toy on a shelf."
S_ORANGE = "A ripe orange and a steel knife on a board."
HAT = "Give the cat a purple hat."
# (scene, categories, instruction, edit, expected instruction or None, verdict); the cases first
LEAK_TABLE = [
    (S_DOGCAT, ["dog", "cat"], "A dog and a cat curled up on a sofa.", "", "A dog and a cat curled up on a sofa.", "ok"),
    (S_DOGCAT, ["dog", "cat"], "A cat sitting to the right of a dog.", "", "A cat sitting to the right of a dog.", "ok"),
    (S_DOGCAT, ["dog", "cat"], "Put the cat to the right of the dog.", "", "Put the cat to the right of the dog.", "ok"),
    (S_DOGCHAIR, ["dog", "chair"], "Show the dog with a shaggy red coat beside the chair.", "", None, "appearance_leak"),
    (S_DOGCHAIR, ["dog", "chair"], "Show the dog with a shaggy coat beside the chair.", "", None, "appearance_leak"),
    (S_DOGCHAIR, ["dog", "chair"], "Show the dog beside the chair.", "", "Show the dog beside the chair.", "ok"),
    (S_DOGCHAIR, ["dog", "chair"], "Put the small chair to the left of the dog.", "",
     "Put the chair to the left of the dog.", "rewritten"),
    (S_DOGCHAIR, ["dog", "chair"], "Put the wooden chair next to the dog.", "", "Put the chair next to the dog.", "rewritten"),
    (S_CARAPPLE, ["car", "apple"], "Put the cart next to the apple.", "", None, "instruction_missing_subject"),
    (S_CARAPPLE, ["car", "apple"], "Put the car next to the apples.", "", "Put the car next to the apples.", "ok"),
    (S_CATCAR, ["cat", "car"], "Show the striped cat next to the car.", "", "Show the cat next to the car.", "rewritten"),
    (S_CATCAR, ["cat", "car"], "Show the cat and the car.", "", "Show the cat and the car.", "ok"),
    (S_CATCAR, ["cat", "car"], "Show the cat alone.", "", None, "instruction_missing_subject"),
    (S_CATCAR, ["cat", "car"], "", "", None, "instruction_empty"),
    (S_CATCAR, ["cat", "car"], "Place the fluffy cat on the roof of the shiny red car.", "",
     "Place the cat on the roof of the car.", "rewritten"),
    (S_CATCAR, ["cat", "car"], "Show the cat with the car.", "", "Show the cat with the car.", "ok"),
    (S_CATCAR, ["cat", "car"], "Show the orange cat beside the car.", "", "Show the cat beside the car.", "rewritten"),
    (S_CATCAR, ["cat", "car"], "Show the cat wearing a purple collar next to the car.", "", None, "appearance_leak"),
    (S_CATCAR, ["cat", "car"], "The cat is striped and sits on the car.", "", None, "appearance_leak"),
    (S_CATCAR, ["cat", "car"], "The cat is on the car.", "", "The cat is on the car.", "ok"),
    (S_CATCAR, ["cat", "car"], "Show the cat sitting on the car.", "", "Show the cat sitting on the car.", "ok"),
    (S_CATCAR, ["cat", "car"], "Show the cat and the car parked on a red carpet.", "",
     "Show the cat and the car parked on a red carpet.", "ok"),
    (S_DOGCUP, ["dog", "cup"], "Show the golden dog and the cup.", "", "Show the dog and the cup.", "rewritten"),
    (S_DOGCUP, ["dog", "cup"], "Show the retriever dog and the cup.", "", "Show the dog and the cup.", "rewritten"),
    (S_DOGCUP, ["dog", "cup"], "Show the dog drinking from the cup.", "", "Show the dog drinking from the cup.", "ok"),
    (S_DOGCUP, ["dog", "cup"], "Show the dog and the blue cup.", "", "Show the dog and the cup.", "rewritten"),
    (S_DOGCAT, ["dog", "cat"], "Show the dog in a red sweater next to the cat.", "", None, "appearance_leak"),
    (S_DOGCAT, ["dog", "cat"], "Show the dog in a park next to the cat.", "", "Show the dog in a park next to the cat.", "ok"),
    (S_DOGCAT, ["dog", "cat"], "Show the sleepy dog and the cat.", "", "Show the sleepy dog and the cat.", "ok"),
    (S_CATCAR, ["cat", "car"], "Show the cat and the car; give the cat a purple hat.", HAT,
     "Show the cat and the car; give the cat a purple hat.", "ok"),
    (S_CATCAR, ["cat", "car"], "Show the cat and the car together.", HAT, None, "instruction_missing_edit"),
    (S_CATCAR, ["cat", "car"], "Show the cat wearing a purple hat beside the car.", HAT,
     "Show the cat wearing a purple hat beside the car.", "ok"),
    (S_CATCAR, ["cat", "car"], "Show the striped cat wearing a purple hat beside the car.", HAT,
     "Show the cat wearing a purple hat beside the car.", "rewritten"),
    (S_GLASS, ["wine glass", "stuffed toy"], "Put the crystal wine glass behind the stuffed toy.", "",
     "Put the wine glass behind the stuffed toy.", "rewritten"),
    (S_GLASS, ["wine glass", "stuffed toy"], "Put the glass behind the toy.", "", None, "instruction_missing_subject"),
    (S_ORANGE, ["orange", "knife"], "Cut the orange with the knife.", "", "Cut the orange with the knife.", "ok"),
    (S_ORANGE, ["orange", "knife"], "Cut the orange with the steel knife.", "", "Cut the orange with the knife.", "rewritten"),
    ("An orange cat and a car.", ["cat", "car"], "Show an orange cat beside a car.", "", "Show a cat beside a car.",
     "rewritten"),
]


@pytest.mark.parametrize("scene,cats,instruction,edit,expected,verdict", LEAK_TABLE)
def test_leak_table(scene, cats, instruction, edit, expected, verdict):
    looks = make_data.appearance_words([scene], cats)
    assert make_data.check_instruction(instruction, cats, looks, edit) == (expected, verdict)


def test_appearance_words_come_from_scene_and_reference_prompts():
    assert make_data.appearance_words(S_CATCAR, ["cat", "car"]) == {"fluffy", "striped", "shiny", "red"}
    assert make_data.appearance_words(S_DOGCAT, ["dog", "cat"]) == set()  # names and relations are not looks
    assert make_data.appearance_words(S_DOGCHAIR, ["dog", "chair"]) == {"shaggy", "red", "coat", "small", "wooden"}
    # "scruffy" is in no lexicon: only the reference prompt says the dog looks so
    looks = make_data.appearance_words([S_DOGCAT, "A photo of a scruffy dog alone on a beach."], ["dog", "cat"])
    assert looks == {"scruffy"}
    assert make_data.check_instruction("Show the scruffy dog and the cat.", ["dog", "cat"], looks) == (
        "Show the dog and the cat.", "rewritten")


def test_references_keep_the_crop_aspect_ratio():
    for w, h in [(100, 100), (300, 120), (90, 400), (512, 200), (37, 81), (1000, 50)]:
        im = make_data.reference_input(Image.new("RGB", (w, h)), 512)
        W, H = im.size
        assert W % 16 == 0 and H % 16 == 0 and 0.8 < W * H / 512 ** 2 < 1.2
        aspect = min(4.0, max(0.25, w / h))  # clamped to 1:4..4:1
        assert abs(W / H - aspect) / aspect < 0.06, (w, h, W, H)


def test_no_two_draws_share_a_seed():
    purposes = ["plan", "prompts", "edit_choice", "scene", "ref0", "ref1", "ref2", "ref3", "edit", "llm1", "llm2",
                "llm_edit1", "vlm1", "vlm2"]
    seeds = [make_data.draw_seed(0, i, p) for i in range(100) for p in purposes]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2 ** 63 for s in seeds)
    assert make_data.draw_seed(0, 5, "scene") == make_data.draw_seed(0, 5, "scene") != make_data.draw_seed(1, 5, "scene")


def test_stage_b_redetection_drops_a_lost_subject(tmp_path):
    """The detector's output is stubbed (an edit that loses a subject is hard to make on purpose with
    random tiny models); the drop logic and the boxes that follow are the real code."""
    out = tmp_path / "b"
    cfg = cfg_for("--preset", "tiny-models", "--out", str(out))
    rows = {0: {"cats": ["dog", "cat"]}, 1: {"cats": ["dog", "cat"]}}
    for i in rows:
        common.save_png(make_data.edit_path(out, i), Image.new("RGB", (64, 64)))
    seen = {"dog": [((2, 2, 30, 30), 0.9)], "cat": [((34, 30, 60, 62), 0.8)]}

    def detector(images, cats):  # id 0's edit lost the cat; id 1 kept both, moved
        return [{"dog": seen["dog"], "cat": []}, seen][: len(images)]

    stats = {"drops": {}}
    make_data.redetect_edits(cfg, out, [0, 1], rows, detector, stats)
    assert stats["drops"] == {"edit_lost_subject": 1}
    assert [r["index"] for r in common.read_jsonl(out / "drops.rank000.jsonl")] == [0]
    assert not make_data.edit_path(out, 0).exists()
    assert make_data.phase_rows(out, "edit") == {1: {"index": 1, "edited": True,
                                                     "boxes": [[2.0, 2.0, 30.0, 30.0], [34.0, 30.0, 60.0, 62.0]]}}


def test_next_block_takes_the_lowest_open_ids():
    # 10 wanted, 3 kept, 2 dropped, 1 deferred this run: 6 more, lowest first, skipping all of those
    assert make_data.next_block(10, {0, 2, 5}, {1, 3}, {4}, 100, 1000) == [6, 7, 8, 9, 10, 11]
    assert make_data.next_block(10, {0, 2, 5}, {1, 3}, {4}, 4, 1000) == [6, 7, 8, 9]  # a round's size
    assert make_data.next_block(10, {0, 2, 5}, {1, 3}, {4}, 100, 8) == [6, 7]  # the max_draws limit
    assert make_data.next_block(3, {0, 2, 5}, set(), set(), 100, 1000) == []


def test_local_llm_garbage_is_a_counted_drop_and_retries_sample(tmp_path, tiny_dir):
    llm = make_data.TextModel("tiny", "llm", device="cpu", tiny_dir=tiny_dir, max_tokens=8)
    assert isinstance(llm("write prompts"), str)
    greedy = [llm.batch(["write prompts"])[0] for _ in range(2)]
    sampled = {llm.batch(["write prompts"], seed=s)[0] for s in range(4)}
    assert greedy[0] == greedy[1] and len(sampled) > 1  # a retry can answer differently
    out = tmp_path / "l"
    cfg = cfg_for("--preset", "tiny-models", "--out", str(out), "--tiny_dir", tiny_dir, "--llm", "tiny")
    stats = {"drops": {}, "deferred": set()}
    make_data.phase_prompts(cfg, out, [0, 1], make_data.load_categories(cfg.categories), stats, "cpu",
                            make_data.Resident("no"))
    assert stats["drops"] == {"llm_unparseable": 2} and not make_data.phase_rows(out, "prompts")


class FakeChat(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions: an LLM for text-only requests, a VLM for ones with an
    image. `fail_first` requests answer 500 (an outage the client must ride out); `garbage` replies prose."""
    log, fail_first, garbage, leak_answer = [], 0, False, "No."

    def do_POST(self):
        import re

        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        text = next(c["text"] for c in content if c["type"] == "text")
        has_image = any(c["type"] == "image_url" for c in content)
        type(self).log.append({"path": self.path, "image": has_image, "text": text})
        if len(type(self).log) <= type(self).fail_first:
            self.send_response(500)
            self.end_headers()
            return
        if type(self).garbage:
            reply = "I cannot help with JSON today."
        elif "Answer with one word: yes or no" in text:  # make_data's second leak layer
            reply = type(self).leak_answer
        elif has_image:
            cats = re.search(r"This image shows: (.*?)\. Write", text).group(1).split(", ")
            edit = re.search(r'this edit: "(.*?)"', text)
            reply = "Show " + " and ".join(f"the {c}" for c in cats) + " together." + (f" {edit.group(1)}" if edit else "")
        elif "Propose one" in text:
            cats = re.search(r"one of these subjects: (.*?)\. Choose", text).group(1).split(", ")
            reply = json.dumps({"subject": cats[0], "edit": f"Give the {cats[0]} a knitted scarf.",
                                "background": "a rainy harbour"})
        else:
            cats = re.search(r"Subjects: (.*?)\. Reply", text).group(1).split(", ")
            reply = "Here you go: " + json.dumps({
                "scene": "Endpoint scene of " + " and ".join(f"a velvet {c}" for c in cats) + ".",
                "subjects": [{"category": c, "prompt": f"Endpoint: a {c} alone on a hill."} for c in cats]})
        data = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def fake_chat():
    FakeChat.log, FakeChat.fail_first, FakeChat.garbage, FakeChat.leak_answer = [], 0, False, "No."
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeChat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def endpoint_args(llm, vlm):
    return ("--llm", llm, "--llm_model", "m", "--vlm", vlm, "--vlm_model", "v", "--endpoint_backoff", "0.01")


def test_endpoints_write_the_prompts_edits_and_instructions(tmp_path, tiny_dir, fake_chat):
    FakeChat.fail_first = 2  # an outage at the start: ridden out by the retries
    out = tmp_path / "ep"
    make_data.main(models_cfg(tiny_dir, out, "--n_samples", "3", "--cache", "false", *endpoint_args(fake_chat, fake_chat)))
    samples = common.load_samples(out)
    assert len(samples) == 3 and all(r["path"] == "/v1/chat/completions" for r in FakeChat.log)
    for s in samples:
        cats = [x["category"] for x in s["subjects"]]
        assert s["meta"]["scene_prompt"] == "Endpoint scene of " + " and ".join(f"a velvet {c}" for c in cats) + "."
        assert s["meta"]["subject_prompts"] == [f"Endpoint: a {c} alone on a hill." for c in cats]
        assert s["instruction"].startswith("Show " + " and ".join(f"the {c}" for c in cats) + " together.")
        if s["task"] in make_data.EDIT_TASKS:  # the VLM was told the edit and stated it
            assert s["meta"]["edit"]["edit"] == f"Give the {cats[0]} a knitted scarf."
            assert "knitted scarf" in s["instruction"]
        if s["task"] == "complex":
            assert s["meta"]["edit"]["background"] == "a rainy harbour" and "rainy harbour" in s["instruction"]
    vlm_calls = [r for r in FakeChat.log if r["image"] and "This image shows" in r["text"]]
    assert len(vlm_calls) == 3 and all("velvet" not in s["instruction"] for s in samples)
    # the second layer asked about each kept instruction, and its "no" is recorded
    questions = [r["text"] for r in FakeChat.log if "Answer with one word: yes or no" in r["text"]]
    assert sorted(questions) == sorted(make_data.leak_question(
        s["instruction"], [x["category"] for x in s["subjects"]],
        make_data.editor_instruction(s["meta"]["edit"]) if s["meta"]["edit"] else "") for s in samples)
    assert all(s["meta"]["vlm_leak_answer"] == "no" for s in samples)


@pytest.mark.parametrize("answer,reason", [("Yes, it says the cat is orange.", "vlm_says_appearance"),
                                           ("It depends.", "vlm_leak_unparseable")])
def test_vlm_leak_question_drops_with_its_own_reason(tmp_path, tiny_dir, fake_chat, answer, reason):
    FakeChat.leak_answer = answer
    out = tmp_path / "q"
    with pytest.raises(SystemExit, match="no sample survived"):
        make_data.main(models_cfg(tiny_dir, out, "--n_samples", "2", "--max_draws", "1", "--cache", "false",
                                  *endpoint_args(fake_chat, fake_chat)))
    assert json.loads((out / "manifest.json").read_text())["dropped"] == {reason: 2}


def test_endpoint_down_defers_ids_and_garbage_drops(tmp_path, tiny_dir, fake_chat):
    out = tmp_path / "down"
    dead = "http://127.0.0.1:9/v1"
    with pytest.raises(SystemExit, match="no sample survived"):  # the VLM is down: nothing kept, nothing dropped for it
        make_data.main(models_cfg(tiny_dir, out, "--n_samples", "2", "--cache", "false", "--endpoint_retries", "2",
                                  *endpoint_args(fake_chat, dead)))
    manifest = json.loads((out / "manifest.json").read_text())
    deferred = manifest["deferred"]
    assert len(deferred) == 2 and not any("endpoint" in r for r in manifest["dropped"])
    calls = len(FakeChat.log)
    make_data.main(models_cfg(tiny_dir, out, "--n_samples", "2", "--cache", "false", *endpoint_args(fake_chat, fake_chat)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 2 and manifest["deferred"] == []
    assert sorted(int(s["id"].rsplit("-", 1)[1]) for s in common.load_samples(out)) == deferred  # finished, not dropped
    assert not [r for r in FakeChat.log[calls:] if not r["image"]]  # the prompts were not asked again
    # an LLM that never replies JSON: asked llm_retries times per id, then the id drops
    FakeChat.log, FakeChat.garbage = [], True
    with pytest.raises(SystemExit, match="no sample survived"):
        make_data.main(cfg_for("--preset", "tiny-models", "--out", str(tmp_path / "g"), "--tiny_dir", tiny_dir,
                               "--n_samples", "1", "--max_draws", "3", *endpoint_args(fake_chat, fake_chat)))
    assert json.loads((tmp_path / "g" / "manifest.json").read_text())["dropped"] == {"llm_unparseable": 3}
    assert len(FakeChat.log) == 9
    llm = make_data.TextModel(dead, "llm", "m", retries=3, backoff=0.01)
    with pytest.raises(RuntimeError, match="llm endpoint http://127.0.0.1:9/v1/chat/completions failed after 3"):
        llm("hello")


def run_md(tmp, out, *extra, nproc=1, die=None):
    args = ["--preset", "tiny", "--out", str(out), "--n_samples", "10", "--cache", "true", *extra]
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "make_data.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(ROOT / "make_data.py"),
               *args, "--device", "cpu"]
    env = {**os.environ, "PSR_DIE_AT": die} if die else None  # common.maybe_die kills the run there
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env)


def dataset_state(out):
    from safetensors.torch import load_file

    rows = common.read_jsonl(out / "samples.jsonl")
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}
    tensors = {}
    for shard in sorted((out / "cache").glob("shard-*.safetensors")):
        tensors.update(load_file(shard))
    return rows, files, tensors


@pytest.fixture(scope="module")
def md_one(tmp_path_factory, tiny_dir):
    """One uninterrupted one-process run_md: the reference of the resume and two-rank tests, made once."""
    tmp = tmp_path_factory.mktemp("md-one")
    res = run_md(tmp, tmp / "one", "--tiny_dir", tiny_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    return tmp / "one"


def test_killed_run_rerun_equals_uninterrupted(tmp_path, tiny_dir, md_one):
    kill_at = random.randint(1, 9)  # a random point after some work
    b = run_md(tmp_path, tmp_path / "b", "--tiny_dir", tiny_dir, die=f"make_data:{kill_at}")
    assert b.returncode != 0, kill_at
    assert not list((tmp_path / "b").rglob("*.tmp"))  # no half-written file left behind
    b = run_md(tmp_path, tmp_path / "b", "--tiny_dir", tiny_dir)
    assert b.returncode == 0, b.stderr[-2000:]
    ra, fa, ta = dataset_state(md_one)
    rb, fb, tb = dataset_state(tmp_path / "b")
    assert ra == rb and len({r["id"] for r in rb}) == len(rb) == 10
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_two_ranks_make_the_same_ids_and_cache(tmp_path, tiny_dir, md_one):
    """Two ranks make the same samples, and each encodes its own share of the cache (its shards and
    part manifest), merged into one manifest that holds every id with the one-process tensors."""
    two = run_md(tmp_path, tmp_path / "two", "--tiny_dir", tiny_dir, nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    r1, r2 = common.read_jsonl(md_one / "samples.jsonl"), common.read_jsonl(tmp_path / "two" / "samples.jsonl")
    assert [r["id"] for r in r1] == [r["id"] for r in r2] and r1 == r2
    assert not list((tmp_path / "two").glob("samples.rank*.jsonl"))  # merged into one dataset
    cache = tmp_path / "two" / "cache"
    parts = {p.name: json.loads(p.read_text()) for p in cache.glob("manifest-r*.json")}
    assert sorted(parts) == ["manifest-r0.json", "manifest-r1.json"]
    share = {n: {i for ids in m["shards"].values() for i in ids} for n, m in parts.items()}
    ids = [r["id"] for r in r2]
    assert share["manifest-r0.json"] == set(ids[0::2]) and share["manifest-r1.json"] == set(ids[1::2])
    merged = json.loads((cache / "manifest.json").read_text())["shards"]
    assert sorted(i for v in merged.values() for i in v) == sorted(ids)
    t1, t2 = dataset_state(md_one)[2], dataset_state(tmp_path / "two")[2]
    assert t1.keys() == t2.keys() and all(torch.allclose(t1[k], t2[k], atol=1e-5) for k in t1)


def test_corrupt_target_is_named_when_caching(tmp_path, tiny_dir):
    out = tmp_path / "c"
    make_data.main(cfg_for("--preset", "tiny", "--out", str(out), "--n_samples", "4", "--cache", "false",
                           "--tiny_dir", tiny_dir))
    s = common.load_samples(out)[2]
    (out / s["target"]).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"sample {s['id']}: image .*{s['target']} is unreadable"):
        make_data.main(cfg_for("--preset", "tiny", "--out", str(out), "--n_samples", "4", "--tiny_dir", tiny_dir))


def test_resume_on_two_then_three_ranks_makes_each_id_once(tmp_path, tiny_dir):
    out = tmp_path / "r"
    args = ["--preset", "tiny-models", "--out", str(out), "--tiny_dir", tiny_dir, "--n_samples", "4", "--max_draws", "12",
            "--cache", "false", "--device", "cpu"]

    def torchrun(n, die=None):
        env = {**os.environ, "PSR_DIE_AT": die} if die else None
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                               str(ROOT / "make_data.py"), *args], capture_output=True, text=True, cwd=tmp_path, env=env)

    a = torchrun(2, die="make_data:1")  # a rank dies after its first sample
    assert a.returncode != 0
    first = {s["id"]: (out / s["target"]).stat().st_mtime_ns
             for p in out.glob("samples.rank*.jsonl") for s in common.read_jsonl(p)}
    assert first
    b = torchrun(3)
    assert b.returncode == 0, b.stderr[-3000:]
    ids = [s["id"] for s in common.load_samples(out)]
    assert len(ids) == len(set(ids)) == 4 and set(first) <= set(ids)
    assert all((out / "targets" / f"{sid}.png").stat().st_mtime_ns == t for sid, t in first.items())  # not made again
    assert json.loads((out / "manifest.json").read_text())["made_this_run"] == 4 - len(first)


# ---------------------------------------------------------------------------------------------
# The leak check on phrasings it was not built from (issue 32). Each case is a whole sample as
# make_data sees it: the scene prompt, each subject's own prompt, the categories, the edit's text,
# and the instruction the VLM wrote. `leak` says whether the instruction tells how a subject looks
# beyond its category. The rule the cases follow: a word that described a subject in the scene or
# in its own prompt may not appear anywhere in the instruction outside the edit's text; a colour,
# material or texture tied to a subject in the instruction is a leak even when no prompt had it;
# the same words describing the setting (room, furniture, light) are clean.
# BLIND_CASES were written before reading check_instruction's branches or the old LEAK_TABLE
# (commit "tests: blind leak cases" holds them alone).
BA = ("A golden retriever with a red collar and a fluffy ginger cat sitting together on a blue sofa "
      "in a bright living room with pastel walls.",
      ["A golden retriever with a red collar running across a green meadow.",
       "A fluffy ginger cat curled up on a wooden windowsill in soft morning light."],
      ["dog", "cat"])
BB = ("A woman in a yellow raincoat walking a small black dog along a rainy city street with red "
      "brick buildings.",
      ["A woman in a yellow raincoat with long curly hair standing in a quiet library.",
       "A small black dog with floppy ears sitting on a green lawn."],
      ["person", "dog"])
BC = ("A carved oak chair, a brass lamp with a pleated shade and a tall ceramic vase with blue glaze "
      "in a minimalist white gallery.",
      ["A carved oak chair on a sunlit terrace.",
       "A brass lamp with a pleated shade on a dark wooden desk.",
       "A tall ceramic vase with blue glaze on a marble countertop."],
      ["chair", "lamp", "vase"])
BLIND_CASES = [
    # scenario, instruction, edit text, leak
    (BA, "The golden dog and the cat sit on a bench in a park.", "", True),
    (BA, "The dog, a golden retriever, plays with the cat in a garden.", "", True),
    (BA, "The cat, whose fur is ginger, watches the dog from a porch.", "", True),
    (BA, "Place the dog (a golden retriever) next to the cat on a beach.", "", True),
    (BA, "The cat's fur is ginger; the dog lies beside it in the snow.", "", True),
    (BA, "The dog and the cat rest in a meadow. Both animals are fluffy and golden.", "", True),
    (BA, "The dog, wearing a red collar, runs toward the cat in a park.", "", True),
    (BA, "The dog chases the cat through a garden. The cat is ginger.", "", True),
    (BA, "A ginger cat and a dog sit under a tree.", "", True),
    (BA, "The dog with its red collar sits beside the cat on a beach.", "", True),
    (BA, "The dog that has golden fur lies next to the cat in a kitchen.", "", True),
    (BA, "Show the cat, which is fluffy, sleeping beside the dog in a library.", "", True),
    (BA, "The dog sits to the left of the cat in a snowy forest; its coat is golden.", "", True),
    (BA, "The cat \u2014 ginger and fluffy \u2014 sits next to the dog on a rug.", "", True),
    (BA, "The retriever sits next to the cat in a park.", "", True),
    # a look word of a subject stays a leak wherever it stands, even describing the light
    (BA, "The dog and the cat rest in golden afternoon light on a porch.", "", True),
    (BA, "The dog, a white poodle, sits next to the cat in a park.", "", True),
    (BA, "The cat has black stripes and sits beside the dog on a rug.", "", True),
    (BA, "The dog and the cat sit on a rug. Both animals are fluffy and brown.", "", True),
    (BA, "The dog and the cat sit together in a green meadow.", "", False),
    (BA, "The dog sits to the left of the cat in a small wooden cabin.", "", False),
    (BA, "The dog and the cat sit in a room with pastel walls.", "", False),
    (BA, "The dog jumps over the cat in a bright living room.", "", False),
    (BA, "The cat is above the dog on a blue sofa.", "", False),
    (BA, "Make the dog wear a green scarf while the cat watches from the sofa.",
     "The dog wears a green scarf.", False),
    (BA, "The dog's paw rests on the cat's back in a sunny garden.", "", False),
    (BA, "The dog and the cat play in a garden. Both animals look happy.", "", False),
    (BA, "The dog, lying in a sunny garden, watches the cat.", "", False),
    (BA, "The cat, which sits on a blue sofa, watches the dog.", "", False),
    (BA, "The dog jumps over the cat in a meadow.", "The dog jumps over the cat.", False),
    (BA, "The dog sits on the left and the cat on the right. The room has pastel walls and a blue sofa.",
     "", False),
    (BB, "The person, dressed in a yellow raincoat, walks the dog across a bridge.", "", True),
    (BB, "The person wearing a raincoat holds the dog's leash in a park.", "", True),
    (BB, "The person walks the dog in a park. The dog is small and black.", "", True),
    (BB, "The person with curly hair kneels beside the dog on a beach.", "", True),
    (BB, "The dog's ears are floppy; it sits next to the person in a kitchen.", "", True),
    (BB, "The person (in a yellow coat) stands to the right of the dog.", "", True),
    (BB, "The black dog sits at the person's feet in a cafe.", "", True),
    (BB, "The person stands behind the dog, whose coat is black, in a snowy field.", "", True),
    (BB, "The person and the dog sit in a red armchair by the fireplace.", "", False),
    (BB, "The person walks the dog along a street lined with red brick buildings.", "", False),
    (BB, "The dog lies on a green lawn while the person reads a book.", "", False),
    (BB, "The person and the dog rest in golden afternoon light on a porch.", "", False),
    (BB, "The person holds an umbrella over the dog in the rain.", "", False),
    (BB, "The dog sits to the left of the person in a quiet library.", "", False),
    (BB, "Have the person wear a blue hat while the dog sits beside them in a park.",
     "The person wears a blue hat.", False),
    (BB, "The person, wearing a blue hat, stands next to the dog.", "The person wears a blue hat.", False),
    (BB, "The person sits next to the dog on a white bench in a snowy park.", "", False),
    (BB, "The person (on the left) and the dog (on the right) stand in a green meadow.", "", False),
    (BB, "The person's hands hold the dog in a bright kitchen.", "", False),
    (BC, "The chair, made of oak, stands to the left of the lamp and the vase in a garden.", "", True),
    (BC, "The lamp's shade is pleated; it stands between the chair and the vase.", "", True),
    (BC, "Place the vase on the chair and the lamp beside them. The vase is ceramic.", "", True),
    (BC, "The ceramic vase sits on the chair next to the lamp.", "", True),
    (BC, "The lamp, which is brass, stands behind the chair and the vase.", "", True),
    (BC, "The vase (blue) stands on the chair near the lamp in a loft.", "", True),
    # "blue" described the vase in its own prompt, so it is a leak even on the curtains
    (BC, "The lamp lights the vase while the chair stands behind them in a library with blue curtains.",
     "", True),
    (BC, "The chair, the lamp and the vase stand in a minimalist white gallery.", "", False),
    (BC, "The vase stands on a marble countertop beside the lamp and the chair.", "", False),
    (BC, "The lamp sits on a dark wooden desk to the right of the chair, with the vase on top.", "", False),
    (BC, "The chair, the lamp and the vase are arranged in a row on a sunlit terrace.", "", False),
    (BC, "The vase, placed on a white shelf, stands beside the lamp and the chair.", "", False),
]
# AFTER_CASES were written after reading the parser (aimed at its weak points: curly apostrophes,
# hyphenated looks, capitals, multi-word categories, four subjects, edits that name looks).
BD = ("A brown dachshund and a grey tabby cat on a porch.",
      ["A brown dachshund digging in a garden.", "A grey tabby cat sleeping on a bookshelf."],
      ["dog", "cat"])
BE = ("A crystal wine glass and a plush pink stuffed toy on a shelf.",
      ["A crystal wine glass on a picnic blanket.", "A plush pink stuffed toy on a bed."],
      ["wine glass", "stuffed toy"])
BF = ("A girl with red braids, a white horse, a spotted dog and a rusty bicycle in a field.",
      ["A girl with red braids reading in a cafe.", "A white horse galloping on a beach.",
       "A spotted dog lying on a porch.", "A rusty bicycle leaning against a brick wall."],
      ["person", "horse", "dog", "bicycle"])
RED_TIE, PURPLE = "Give the cat a red bow tie.", "Paint the dog bright purple."
AFTER_CASES = [
    (BD, "Place the dog (a brown dachshund) beside the cat on a porch.", "", True),
    (BD, "Show the dog in a green meadow next to the cat.", "", False),
    (BD, "The dog and the cat nap in a small wooden cabin.", "", False),
    (BD, "The cat sits in a red armchair and the dog lies at its feet.", "", False),
    (BD, "The dog and the cat sleep in a room with pastel walls.", "", False),
    (BD, "The cat looks grey next to the dog.", "", True),
    (BD, "The dog, who is brown, naps beside the cat.", "", True),
    (BD, "The dog and the cat curl up together; they are both grey.", "", True),
    (BD, "The dog sits with the cat by a blue lake.", "", False),
    (BD, "The cat\u2019s tabby stripes show as it sits beside the dog.", "", True),
    (BD, "THE DOG AND THE CAT SIT ON A BROWN RUG.", "", True),  # the dog's own look, on the rug
    (BD, "The dog is wearing a knitted sweater next to the cat.", "", True),
    (BD, "The dog chases a red ball past the cat.", "", False),
    (BD, "The dog with a ball chases the cat across a yellow field.", "", False),
    (BD, "The grey-furred cat naps beside the dog.", "", True),
    (BD, "The dog wears a scarf and sits by the cat.", "", True),
    (BD, "Give the cat a red bow tie and seat it next to the dog on a sofa.", RED_TIE, False),
    (BD, "The cat, wearing a red bow tie, sits next to the brown dog.", RED_TIE, True),
    (BD, "Paint the dog bright purple and place it beside the cat.", PURPLE, False),
    (BD, "The dog, now bright purple, sits beside the cat.", PURPLE, False),
    (BE, "Put the wine glass in front of the stuffed toy on a white table.", "", False),
    (BE, "Put the wine glass next to the pink stuffed toy.", "", True),
    (BE, "The stuffed toy, which is plush and pink, sits beside the wine glass.", "", True),
    (BE, "The wine glass stands on a picnic blanket beside the stuffed toy.", "", False),
    (BE, "The stuffed toy sits behind the wine glass in soft pink light.", "", True),
    (BE, "The wine glass's rim catches the light beside the stuffed toy.", "", False),
    (BF, "The person rides the horse while the dog runs beside the bicycle in a field.", "", False),
    (BF, "The person with red braids rides the horse next to the dog and the bicycle.", "", True),
    (BF, "The horse, a white mare, stands near the person, the dog and the bicycle.", "", True),
    (BF, "The person leans the bicycle against a brick wall while the horse and the dog watch.", "", False),
    (BF, "The person, the horse, the dog and the bicycle are in a sunny field. The bicycle is rusty.", "", True),
    (BF, "The dog, spotted all over, lies between the horse and the bicycle near the person.", "", True),
    (BF, "The horse gallops past the person, the dog and the bicycle on a beach at sunset.", "", False),
    (BF, "Show the person reading in a cafe with the horse, the dog and the bicycle outside.", "", False),
    (BF, "The person stands to the left of the horse, the dog lies under the bicycle, all on green grass.", "",
     False),
    (BF, "The horse is white and the dog sits near the person and the bicycle.", "", True),
    (BF, "The person's red braids swing as the horse trots past the dog and the bicycle.", "", True),
    (BA, "The cat sits on the dog's back in a sunny meadow.", "", False),
    (BB, "The dog sits beside the person in a yellow-walled kitchen.", "", True),  # the person's own look
    (BC, "The vase holds fresh flowers beside the lamp and the chair in a sunlit room.", "", False),
    (BC, "The lamp stands tall between the chair and the vase.", "", True),  # the vase's own look
    (BA, "The dog and the cat share a blanket by a crackling fire; the light is warm and golden.", "", True),
    (BA, "The dog watches the cat from under a blue table.", "", False),
]


def check_case(scenario, instruction, edit):
    scene, prompts, cats = scenario
    looks = make_data.appearance_words([scene] + prompts, cats)
    return make_data.check_instruction(instruction, cats, looks, edit, own=make_data.own_looks(prompts, cats))


@pytest.mark.parametrize("scenario,instruction,edit,leak", BLIND_CASES + AFTER_CASES)
def test_leak_check_on_new_phrasings(scenario, instruction, edit, leak):
    text, verdict = check_case(scenario, instruction, edit)
    if not leak:
        assert (text, verdict) == (instruction, "ok")
    elif verdict == "rewritten":  # a look before the noun was cut out: what is left passes as clean
        assert text != instruction and check_case(scenario, text, edit) == (text, "ok")
    else:
        assert (text, verdict) == (None, "appearance_leak")


def test_new_leak_table_is_large_and_half_blind():
    assert len(BLIND_CASES) + len(AFTER_CASES) >= 60 and len(BLIND_CASES) * 2 >= len(BLIND_CASES) + len(AFTER_CASES)
    for table in (BLIND_CASES, AFTER_CASES):
        assert sum(leak for *_, leak in table) >= 10 and sum(not leak for *_, leak in table) >= 10


def test_own_looks_read_a_narrower_noun_and_its_phrase():
    assert make_data.own_looks(BA[1], BA[2]) == {"golden", "retriever", "red", "collar", "fluffy", "ginger"}
    # the setting of a subject's prompt ("wooden windowsill", "green meadow") is not its look
    assert make_data.own_looks(BC[1], BC[2]) == {"carved", "oak", "brass", "pleated", "shade", "tall", "ceramic",
                                                 "blue", "glaze"}


# boxes crossing each edge of a 100x80 image, one crossing all four, one wholly outside
EDGE_BOXES = [((-5.2, 10, 40, 50), (0, 10, 40, 50)),     # left
              ((10, -3, 50, 40), (10, 0, 50, 40)),       # top
              ((60, 10, 104.5, 50), (60, 10, 100, 50)),  # right
              ((10, 40.5, 50, 90), (10, 40, 50, 80)),    # bottom
              ((-1, -1, 101, 81), (0, 0, 100, 80)),      # all four
              ((-30, -30, -2, -2), None), ((100, 10, 120, 50), None)]


@pytest.mark.parametrize("box,clipped", EDGE_BOXES)
def test_crop_at_the_image_edge_is_clipped_never_the_whole_scene(box, clipped):
    import rewards

    im = Image.new("RGB", (100, 80))
    assert make_data.clip_box(box, im.size) == clipped
    det = {"dog": [(box, 0.9)]}
    if clipped is None:
        assert make_data.filter_boxes(det, ["dog"], im.size, True, 0.0) == (None, "crop_empty")
        with pytest.raises(ValueError, match="outside"):
            make_data.crop_of(im, box)
        return
    assert make_data.filter_boxes(det, ["dog"], im.size, True, 0.0) == ([[float(v) for v in clipped]], "ok")
    assert make_data.crop_of(im, box).size == make_data.crop_dims(box, im.size) == (clipped[2] - clipped[0],
                                                                                   clipped[3] - clipped[1])
    if box[0] < 0 or box[1] < 0:  # the authors' slicing (kept for the benchmark's official mode) counts from
        # the far edge: the whole scene for the left and top boxes (empty slice), one pixel for the last
        assert rewards.crop(im, box).size == (im.size if box[2] < 100 else (1, 1))


class StubDetector:
    """Stands in for Grounding DINO (the detector is not what these tests test): image k of the run
    gets pattern k % 3 for its categories: 0 boxes that cross the four edges (kept, clipped), 1 a box
    wholly outside the image (crop_empty), 2 one box for every category (boxes_overlap)."""
    EDGES = [(-5.2, 2, 20, 30), (30, -3, 60, 20), (40, 30, 70, 60), (2, 40, 30, 66)]

    def __init__(self):
        self.k = 0

    def __call__(self, images, categories):
        out = []
        for cats in categories:
            pattern, self.k = self.k % 3, self.k + 1
            boxes = {0: self.EDGES, 1: [(-30, -30, -2, -2)] + self.EDGES[1:], 2: [(10, 10, 50, 50)] * 4}[pattern]
            out.append({c: [(b, 0.9)] for c, b in zip(cats, boxes)})
        return out


def test_edge_crops_and_overlaps_are_drop_reasons_in_the_manifest(tmp_path, tiny_dir, monkeypatch):
    stub = StubDetector()
    monkeypatch.setattr(make_data, "load_detector", lambda cfg, device: stub)
    out = tmp_path / "edges"
    make_data.main(models_cfg(tiny_dir, out, "--n_samples", "3", "--cache", "false", "--max_pair_iou", "0.7"))
    dropped = json.loads((out / "manifest.json").read_text())["dropped"]
    assert dropped.get("crop_empty", 0) + dropped.get("edit_crop_empty", 0) > 0
    assert dropped.get("boxes_overlap", 0) + dropped.get("edit_boxes_overlap", 0) > 0
    for s in common.load_samples(out):  # kept: the clipped boxes, each reference from its own crop
        assert s["meta"]["boxes"] == [[float(v) for v in make_data.clip_box(b, (64, 64))]
                                      for b in StubDetector.EDGES[:len(s["subjects"])]]
        for k, sub in enumerate(s["subjects"]):
            with Image.open(out / sub["ref"]) as im:
                assert im.size == make_data.ref_input_size(*make_data.crop_dims(s["meta"]["boxes"][k], (64, 64)), 64)


# the bad-input table: (knobs on top of the tiny-models preset, the one line expected). {tmp} is a
# scratch folder holding empty.txt (no names), binary.txt (not text) and empty/ (a folder, no config).
BAD_INPUT = [
    (["--t2i", "/nope/flux-dev"], "--t2i /nope/flux-dev: no such folder (and not a hub id owner/name)"),
    (["--detector", "/nope/gdino"], "--detector /nope/gdino: no such folder (and not a hub id owner/name)"),
    (["--preset", "tiny", "--model", "/nope/kontext"], "--model /nope/kontext: no such folder (and not a hub id owner/name)"),
    (["--categories", "{tmp}/empty.txt"], "--categories {tmp}/empty.txt: 0 distinct categories; the task mix draws "
                                          "up to 4 per sample"),
    (["--categories", "{tmp}/binary.txt"], "--categories {tmp}/binary.txt: not UTF-8 text (one category name a line)"),
    (["--categories", "{tmp}/missing.txt"], "--categories {tmp}/missing.txt: no such file"),
    # caught earlier, by common.parse_config's length check of list knobs (issue 29), before make_data runs
    (["--task_mix", "1,1,1"], "--task_mix has 3 values [1.0, 1.0, 1.0]; it takes 7 (one weight per task, in TASKS "
                              "order), e.g. --task_mix 1.0,1.0,1.0,1.0,1.0,0.5,0.5"),
    (["--task_mix", "0,0,0,0,0,0,0"], "--task_mix 0.0,0.0,0.0,0.0,0.0,0.0,0.0: weights must be finite, >= 0, not all 0"),
    (["--n_samples", "0"], "--n_samples 0: must be at least 1"),
    (["--resolution", "100"], "--resolution 100: must be a positive multiple of 16 (VAE 8x, then 2x2 packing)"),
    (["--dino", "{tmp}/empty"], "--dino {tmp}/empty: the folder has no config.json"),
    (["--vlm", "http://"], "--vlm http://: a URL without a host"),
    (["--llm", "my llm"], "--llm my llm: no such folder (and not a hub id owner/name)"),
    (["--max_pair_iou", "1.5"], "--max_pair_iou 1.5: must be between 0 and 1"),
    (["--gen_batch", "0"], "--gen_batch 0: must be at least 1"),
    (["--max_draws", "0.5"], "--max_draws 0.5: must be at least 1"),
    (["--device", "gpu"], "--device 'gpu': one of cpu, cuda, cuda:N, mps (empty: cuda when there is one)"),
    (["--keep_models", "maybe"], "--keep_models maybe: one of auto, yes, no"),
]


@pytest.mark.parametrize("knobs,line", BAD_INPUT, ids=[" ".join(k) for k, _ in BAD_INPUT])
def test_bad_input_fails_first_in_one_line(tmp_path, tiny_dir, knobs, line):
    (tmp_path / "empty.txt").write_text("# no names\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    (tmp_path / "empty").mkdir()
    knobs = [k.replace("{tmp}", str(tmp_path)) for k in knobs]
    out = tmp_path / "out"
    args = ["--preset", "tiny-models", "--out", str(out), "--tiny_dir", tiny_dir] + knobs
    with pytest.raises(SystemExit) as e:
        make_data.main(cfg_for(*args))
    lines = str(e.value).splitlines()  # make_data's own check heads its line; the preset/knob parser's needs no head
    assert lines[-1:] == [line.replace("{tmp}", str(tmp_path))] and lines[:-1] in ([], ["[make_data] bad input:"])
    assert not out.exists()  # nothing written: it failed before any model loaded


def test_a_torn_last_line_is_cut_before_appending(tmp_path, capsys):
    """Every appended file (make_data's rows, bench's item scores, the logs) goes through append_jsonl."""
    path = tmp_path / "detect.rank000.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}\n{"ind')  # a writer killed mid-line (or a full disk)
    common.append_jsonl(path, {"index": 2})
    assert common.read_jsonl(path) == [{"index": 0}, {"index": 1}, {"index": 2}]
    assert "cut a torn last line (5 bytes)" in capsys.readouterr().out
    common.append_jsonl(path, {"index": 3})  # a whole file is left alone
    assert [r["index"] for r in common.read_jsonl(path)] == [0, 1, 2, 3]


@pytest.mark.parametrize("keep", ["auto", "no"])
def test_models_stay_loaded_across_rounds(tmp_path, tiny_dir, monkeypatch, keep):
    loads = {"t2i": 0, "detector": 0}

    def counted(name, load):
        def wrapper(*a):
            loads[name] += 1
            return load(*a)
        return wrapper

    monkeypatch.setattr(make_data, "load_t2i_pipe", counted("t2i", make_data.load_t2i_pipe))
    monkeypatch.setattr(make_data, "load_detector", counted("detector", make_data.load_detector))
    out = tmp_path / keep
    make_data.main(models_cfg(tiny_dir, out, "--n_samples", "3", "--round_size", "1", "--cache", "false",
                              "--keep_models", keep, "--task_mix", "0,0,1,1,0,0,0"))  # no edits: one detection a round
    rounds = len(list((out / "work" / "sync").glob("*-round*.rank000")))
    assert rounds >= 3
    assert loads == ({"t2i": 1, "detector": 1} if keep == "auto" else {"t2i": rounds, "detector": rounds})


def test_models_source_killed_and_resumed_equals_uninterrupted(tmp_path, tiny_dir):
    """The model pipeline with its models kept across rounds: killed after its second sample and
    rerun, it writes the same samples and the same image bytes as a run never killed."""
    extra = ("--preset", "tiny-models", "--tiny_dir", tiny_dir, "--n_samples", "3", "--round_size", "1",
             "--cache", "false")
    a = run_md(tmp_path, tmp_path / "a", *extra)
    assert a.returncode == 0, a.stderr[-2000:]
    b = run_md(tmp_path, tmp_path / "b", *extra, die="make_data:2")
    assert b.returncode != 0
    b = run_md(tmp_path, tmp_path / "b", *extra)
    assert b.returncode == 0, b.stderr[-2000:]
    (ra, fa, _), (rb, fb, _) = dataset_state(tmp_path / "a"), dataset_state(tmp_path / "b")
    assert ra == rb and len(ra) == 3 and fa == fb
