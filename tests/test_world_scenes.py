"""world/scenes.py: the training draws stay as they were, and the subject-count sets (issue 24) hold
2 to 8 separate subjects named in order, with square or varied references."""
import hashlib
import itertools

import pytest

import common
from world import scenes

WORLD_MIX = (1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5)  # make_data's default task mix (world/perception.py)


def digest(samples):
    """One hash over everything draw_sample returns: ids, tasks, texts, subjects, meta, every pixel."""
    h = hashlib.sha256()
    for sid, task, text, subjects, target, refs, meta in samples:
        h.update(repr((sid, task, text, subjects, meta)).encode())
        for im in (target, *refs):
            h.update(repr(im.size).encode() + im.tobytes())
    return h.hexdigest()[:16]


# Taken from draw_sample before the subject-count sets were added (commit 30d4f26): make_data's
# datasets, and the world models trained on them, must not change with this file.
GOLDEN = {"mix-32": "e53bc43c663abd99", "per-task-64": "cc5e252a929145be"}


def test_training_draws_are_unchanged():
    mixed = [scenes.draw_sample(i, 7, 32, WORLD_MIX) for i in range(40)]
    per_task = [scenes.draw_sample(i, 3, 64, tuple(float(t == task) for t in common.TASKS), id_offset=9_000_000)
                for task in common.TASKS for i in range(3)]
    assert {"mix-32": digest(mixed), "per-task-64": digest(per_task)} == GOLDEN


def disjoint(a, b):
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


@pytest.mark.parametrize("n", range(2, 9))
def test_a_group_holds_n_separate_subjects_named_in_order(n):
    for i in range(6):
        sid, task, text, subjects, target, refs, meta = scenes.draw_group(i, 0, 32, n)
        shapes = [s["shape"] for s in subjects]
        assert len(set(shapes)) == n == len(refs) == len(meta["boxes"])
        assert text.startswith("Show the ") and text.endswith(" together in one picture.")
        where = [text.index(f"the {s} ") if f"the {s} " in text else text.index(f"the {s},") for s in shapes]
        assert where == sorted(where)  # named in reference order
        for box in meta["boxes"]:
            assert 0 <= box[0] < box[2] <= 32 and 0 <= box[1] < box[3] <= 32
            assert (box[2] - box[0]) / 2 >= 4.2  # a radius of at least 4 px even with 8 subjects at 32 px
        assert all(disjoint(a, b) for a, b in itertools.combinations(meta["boxes"], 2))
        assert target.size == (32, 32) and all(r.size == (32, 32) for r in refs)
    a, b = scenes.draw_group(5, 0, 32, n), scenes.draw_group(5, 0, 32, n)
    assert a[2] == b[2] and a[4].tobytes() == b[4].tobytes()  # a pure function of (seed, index, n)
    assert scenes.draw_group(5, 1, 32, n)[4].tobytes() != a[4].tobytes()


def test_up_to_four_subjects_a_group_is_laid_out_as_training_draws_are():
    radius = {2: 32 / 5.2, 3: 32 / 5.6, 4: 32 / 5.6}  # scenes.layout's radius for each count
    for n, r in radius.items():
        boxes = scenes.draw_group(0, 0, 32, n)[6]["boxes"]
        assert all((b[2] - b[0]) / 2 == pytest.approx(r, abs=0.1) for b in boxes)


def test_a_group_of_one_or_nine_is_refused():
    for n in (1, 9):
        with pytest.raises(ValueError, match="2 to 8 subjects"):
            scenes.draw_group(0, 0, 32, n)


def test_varied_references_change_only_the_references():
    for n in (2, 5, 8):
        a, b = scenes.draw_group(3, 0, 32, n), scenes.draw_group(3, 0, 32, n, varied_refs=True)
        assert a[2] == b[2] and a[3] == b[3] and a[6] == b[6] and a[4].tobytes() == b[4].tobytes()
    sizes = [r.size for i in range(12) for r in scenes.draw_group(i, 0, 32, 4, varied_refs=True)[5]]
    ratios = {round(w / h, 1) for w, h in sizes}
    assert {0.5, 1.0, 2.0} <= ratios  # tall, square and wide references all occur
    areas = [w * h for w, h in sizes]
    assert max(areas) > 2.5 * min(areas)  # and their sizes vary
    for w, h in sizes:  # the stages scale each to about the target's area, keeping its shape (common.ref_size)
        th, tw = common.ref_size(w, h, 32 * 32, 8)
        assert 512 <= th * tw <= 2048 and (tw > th) == (w > h) and (tw < th) == (w < h)
