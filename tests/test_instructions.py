"""Inst-IT annotations -> instruction samples: dialogue structure, seeded wording, validation."""

from __future__ import annotations

import copy
import json

import pytest

from data_pipeline.instructions import (
    Templates, even_subsample, image_samples, load_templates, pick, video_samples,
)
from instit_jax.processing.errors import SampleError

T = Templates()


def image_entry(**change):
    entry = {"image_id": 5, "image_path": "coco/5.jpg",
             "instance_level_caption": {"2": "A cat on the sofa next to [1].", "1": "A man in a red shirt.",
                                        "10": "A lamp."},
             "image_level_caption": "[1] sits on a sofa while [2] sleeps; [10] is on."}
    entry.update(change)
    return entry


def video_entry(num_frames=3, **change):
    frames = []
    for t in range(1, num_frames + 1):
        instances = {"1": f"man at <{t}>"} if t < 3 else {"1": "man", "2": "a woman entering"}
        frames.append({"timestamp": t, "frame_name": f"{t:04d}.jpg", "instance_level": instances,
                       "image_level": f"a street, frame {t}",
                       "temporal_change": None if t == 1 else f"[1] moves right between <{t - 1}> and <{t}>."})
    entry = {"video_id": 42, "video_path": "clips/42", "frame_level_caption": frames,
             "question_answer_pairs": [{"question": "Who appears at <3>?", "answer": "[2] enters at <3>."},
                                       {"question": "What does [1] do?", "answer": "[1] walks."}],
             "video_level_caption": "[1] walks from <1> to <3>; [2] arrives at <3>."}
    entry.update(change)
    return entry


def test_image_two_turn_dialogue():
    (s,) = image_samples(image_entry(), item="instit_image/5", templates=T, seed=0)
    assert s.media_kind == "image" and s.frame_files == ("coco/5.jpg",) and s.timestamps == ()
    roles = [r for r, _ in s.turns]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert s.turns[0][1].startswith("<image>\n") and s.turns[0][1][len("<image>\n"):] in T.instances
    assert "<image>" not in s.turns[2][1] and s.turns[2][1] in T.scene
    # All instance captions, numerically ordered, [ID] references kept as written.
    assert s.turns[1][1] == "[1] A man in a red shirt.\n[2] A cat on the sofa next to [1].\n[10] A lamp."
    assert s.turns[3][1] == "[1] sits on a sofa while [2] sleeps; [10] is on."
    assert s.instance_ids == (1, 2, 10)
    assert s.metadata["image_id"] == 5


def test_image_without_instances_keeps_the_scene_turn_only():
    (s,) = image_samples(image_entry(instance_level_caption={}, image_level_caption="An empty room."),
                         item="i", templates=T, seed=0)
    assert [r for r, _ in s.turns] == ["user", "assistant"]
    assert s.turns[0][1].startswith("<image>\n") and s.turns[1][1] == "An empty room."


def test_wording_is_seeded_and_drawn_from_the_templates():
    def wording(seed, n):
        return [image_samples(image_entry(image_id=i), item=f"instit_image/{i}", templates=T, seed=seed)[0].turns[0][1]
                for i in range(n)]

    assert wording(0, 40) == wording(0, 40)  # same seed, same ids -> same wording
    assert wording(0, 40) != wording(1, 40)
    used = {w[len("<image>\n"):] for w in wording(0, 40)}
    assert used == set(T.instances)  # every option gets used, nothing else
    # Independent of processing order: a sample's wording depends on its id, not on its neighbours.
    assert pick(T.scene, 7, "x/scene") == pick(T.scene, 7, "x/scene")
    custom = Templates(instances=("List the instances.",), scene=("Whole scene?",))
    (s,) = image_samples(image_entry(), item="i", templates=custom, seed=3)
    assert s.turns[0][1] == "<image>\nList the instances." and s.turns[2][1] == "Whole scene?"


def test_templates_are_configurable_and_checked(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"video_caption": ["Caption it."]}))
    t = load_templates(str(path))
    assert t.video_caption == ("Caption it.",) and t.scene == T.scene
    path.write_text(json.dumps({"captions": ["x"]}))
    with pytest.raises(ValueError, match="keys among"):
        load_templates(str(path))
    with pytest.raises(ValueError, match="non-empty list"):
        Templates(scene=())
    with pytest.raises(ValueError, match="added by the builder"):
        Templates(scene=("<image> describe",))


def test_video_samples_and_the_frames_they_carry():
    samples = video_samples(video_entry(), item="instit_video/42", templates=T, seed=0)
    by_id = {s.id: s for s in samples}
    assert list(by_id) == ["instit_video/42/frame/1", "instit_video/42/frame/2", "instit_video/42/frame/3",
                           "instit_video/42/change/2", "instit_video/42/change/3",
                           "instit_video/42/caption", "instit_video/42/qa"]
    f2 = by_id["instit_video/42/frame/2"]
    assert f2.media_kind == "image" and f2.frame_files == ("clips/42/0002.jpg",) and f2.metadata["timestamp"] == 2
    assert f2.turns[1][1] == "[1] man at <2>"  # <t> kept as written
    c3 = by_id["instit_video/42/change/3"]
    assert c3.media_kind == "video" and c3.frame_files == ("clips/42/0002.jpg", "clips/42/0003.jpg")
    assert c3.timestamps == (2.0, 3.0) and c3.instance_ids == (1, 2)
    assert c3.turns[0][1][len("<image>\n"):] in T.temporal_change and c3.turns[1][1] == "[1] moves right between <2> and <3>."
    cap = by_id["instit_video/42/caption"]
    assert cap.frame_files == tuple(f"clips/42/{t:04d}.jpg" for t in (1, 2, 3)) and cap.timestamps == (1.0, 2.0, 3.0)
    assert cap.turns[1][1] == "[1] walks from <1> to <3>; [2] arrives at <3>."
    assert cap.metadata["frames_subsampled"] is False
    qa = by_id["instit_video/42/qa"]
    assert qa.turns == (("user", "<image>\nWho appears at <3>?"), ("assistant", "[2] enters at <3>."),
                        ("user", "What does [1] do?"), ("assistant", "[1] walks."))
    assert qa.frame_files == cap.frame_files and qa.timestamps == cap.timestamps


def test_long_videos_are_subsampled_evenly_and_say_so():
    samples = video_samples(video_entry(num_frames=50), item="v", templates=T, seed=0)
    cap = next(s for s in samples if s.id == "v/caption")
    assert len(cap.frame_files) == 32 and cap.timestamps[0] == 1.0 and cap.timestamps[-1] == 50.0
    assert list(cap.timestamps) == sorted(set(cap.timestamps))
    assert cap.metadata["frames_subsampled"] is True and cap.metadata["num_frames_total"] == 50
    assert sum(s.id.startswith("v/frame/") for s in samples) == 50  # per-frame dialogues are not subsampled
    small = video_samples(video_entry(num_frames=10), item="v", templates=T, seed=0, max_frames=4)
    assert next(s for s in small if s.id == "v/caption").timestamps == (1.0, 4.0, 7.0, 10.0)
    assert even_subsample(5, 8) == [0, 1, 2, 3, 4] and even_subsample(9, 3) == [0, 4, 8]


def test_video_without_qa_has_no_qa_sample():
    samples = video_samples(video_entry(question_answer_pairs=[]), item="v", templates=T, seed=0)
    assert not any(s.id.endswith("/qa") for s in samples)


def _frames_with(change_frame: int, **fields):
    entry = video_entry()
    entry["frame_level_caption"][change_frame].update(fields)
    return entry


@pytest.mark.parametrize("entry,problem", [
    (image_entry(image_level_caption="[3] is here"), r"image_level_caption refers to \[3\], not among the instances \[1, 2, 10\]"),
    (image_entry(instance_level_caption={"1": "next to [4]"}, image_level_caption="x"), r"caption of instance \[1\] refers to \[4\]"),
    ({k: v for k, v in image_entry().items() if k != "image_path"}, "missing field 'image_path'"),
    (image_entry(image_level_caption=7), "'image_level_caption' must be str, got int"),
    (image_entry(image_level_caption="  "), "'image_level_caption' is empty"),
    (image_entry(instance_level_caption=["a"]), "must be Mapping, got list"),
    (image_entry(instance_level_caption={"one": "a"}), "instance key 'one' is not a positive integer"),
    (image_entry(image_id=True), "'image_id' must be int/str, got bool"),
    ("not an object", "entry must be an object"),
])
def test_bad_image_entries_are_rejected_with_a_reason(entry, problem):
    with pytest.raises(SampleError, match=problem) as info:
        image_samples(entry, item="instit_image/5", templates=T, seed=0)
    assert info.value.sample == "instit_image/5"


@pytest.mark.parametrize("entry,problem", [
    (_frames_with(0, image_level="[2] is not here yet"), r"frame <1> image_level refers to \[2\]"),
    (_frames_with(1, temporal_change="[7] leaves"), r"frame <2> temporal_change refers to \[7\]"),
    (video_entry(video_level_caption="[9] appears"), r"video_level_caption refers to \[9\]"),
    (video_entry(video_level_caption="at <8> [1] stops"), r"video_level_caption refers to timestamp\(s\) \[8\]"),
    (video_entry(question_answer_pairs=[{"question": "who is [5]?", "answer": "x"}]), r"question_answer_pairs\[0\].question refers to \[5\]"),
    (video_entry(question_answer_pairs=[{"question": "q"}]), "missing field 'answer'"),
    (_frames_with(0, temporal_change="something"), "the first frame cannot have a temporal_change"),
    (_frames_with(1, timestamp="2"), "'timestamp' must be int, got str"),
    (_frames_with(1, timestamp=1), "repeated timestamps"),
    (_frames_with(2, instance_level=None), "'instance_level' must be Mapping, got NoneType"),
    (video_entry(frame_level_caption=[]), "frame_level_caption is empty"),
    (video_entry(question_answer_pairs=None), "'question_answer_pairs' must be list"),
])
def test_bad_video_entries_are_rejected_with_a_reason(entry, problem):
    with pytest.raises(SampleError, match=problem):
        video_samples(entry, item="instit_video/42", templates=T, seed=0)


def test_temporal_change_may_name_the_previous_frames_instances():
    entry = video_entry()
    # Frame 3 has [1] and [2]; frame 2 only [1]. A change at frame 2 mentioning [2] is invalid, but
    # a change at frame 3 may mention an instance that only the previous frame had.
    entry["frame_level_caption"][1]["instance_level"] = {"1": "man", "3": "a dog"}
    entry["frame_level_caption"][2]["temporal_change"] = "[3] left the scene; [2] came in."
    ok = copy.deepcopy(entry)
    samples = video_samples(ok, item="v", templates=T, seed=0)
    assert next(s for s in samples if s.id == "v/change/3").instance_ids == (1, 2, 3)
    entry["frame_level_caption"][1]["temporal_change"] = "[2] appears"
    with pytest.raises(SampleError, match=r"frame <2> temporal_change refers to \[2\]"):
        video_samples(entry, item="v", templates=T, seed=0)
