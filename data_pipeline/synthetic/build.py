"""``make_world``: generate the whole synthetic world into one directory (seeded, byte-deterministic).

Layout of ``out_dir`` (all paths in the JSON files are relative to it, so it is the media root)::

    manifest.json            parameters, counts, tokenizer ids, bench summary, sha256 of every file
    inst_it_image.json       Inst-IT Dataset image annotations (marked training images)
    inst_it_video.json       Inst-IT Dataset video annotations (marked training videos)
    llava_stage1.json        LLaVA conversations about the *unmarked* images (general instructions)
    llava_stage2.json        LLaVA conversations with [ID] questions on the marked images and videos
    images_vpt/NNNNNN.jpg    marked training images      images_raw/NNNNNN.jpg  the same, unmarked
    videos_vpt/NNNNNN/TTT.jpg  marked training video frames
    masks/<set>/...png       ground-truth label maps (pixel = instance id, 0 = background)
    ground_truth.json        every object's attributes on every frame, and the video events
    bench/                   the held-out bench (see ``bench.py``)
    tokenizer/               HF tokenizer trained on all of the above text

Every scene has its own random stream (seed, set, index), so e.g. adding videos does not change the
images. The world is written to ``<out_dir>.tmp`` and renamed when complete; an existing world with
the same parameters is reused, one with different parameters is an error unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator

import numpy as np

from data_pipeline import instructions
from data_pipeline.synthetic import annotations as ann
from data_pipeline.synthetic import bench, questions, render, text, tokenizer
from data_pipeline.synthetic.world import Scene, sample_image_scene, sample_video_scene
from instit_jax.eval.prompts import user_turn
from instit_jax.processing.prompts import get_template, render_prompt

GENERATOR = "instit-jax synthetic world v1"
MANIFEST = "manifest.json"
# Random stream per scene set; question sampling for a scene uses stream + 100.
_STREAMS = {"images": 1, "videos": 2, "bench_images": 3, "bench_videos": 4}
_FILE_STREAMS = {"stage1": 201, "stage2": 202, "bench_image": 301, "bench_video": 302}
STAGE1_FORMATS = {"plain": 0.5, "mc": 0.5}
STAGE2_FORMATS = {"plain": 0.4, "mc": 0.45, "oe": 0.15}
CAPTION_REQUESTS = ("Describe the image.", "What is in the image?")


@dataclasses.dataclass(frozen=True)
class WorldParams:
    seed: int = 0
    num_images: int = 400
    num_videos: int = 120
    bench_images: int = 50
    bench_videos: int = 25
    image_size: int = 112
    min_frames: int = 4
    max_frames: int = 8
    bench_questions_per_image: int = 2
    bench_questions_per_video: int = 4
    vocab_size: int = 512

    def check(self) -> None:
        for name in ("num_images", "num_videos", "bench_images", "bench_videos"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.bench_images + self.bench_videos == 0 or self.num_images + self.num_videos == 0:
            raise ValueError("a world needs some training scenes and some bench scenes")
        if not 2 <= self.min_frames <= self.max_frames:
            raise ValueError(f"need 2 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        if self.image_size < 48:
            raise ValueError(f"image_size {self.image_size} is too small for legible marks (>= 48)")


@dataclasses.dataclass(frozen=True)
class WorldPaths:
    root: str  # also the media root of every relative path in the JSON files
    manifest: str
    inst_it_image: str
    inst_it_video: str
    llava_stage1: str
    llava_stage2: str
    bench_dir: str
    tokenizer_dir: str

    @classmethod
    def under(cls, root: str) -> WorldPaths:
        j = lambda name: os.path.join(root, name)  # noqa: E731
        return cls(root, j(MANIFEST), j("inst_it_image.json"), j("inst_it_video.json"), j("llava_stage1.json"),
                   j("llava_stage2.json"), j("bench"), j("tokenizer"))

    def read_manifest(self) -> dict:
        with open(self.manifest, encoding="utf-8") as f:
            return json.load(f)


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _write_json(path: str, obj) -> None:
    """Lists one item per line (readable, and json's fast C encoder: no ``indent``); dicts indented."""
    if isinstance(obj, list):
        body = "[\n" + ",\n".join(json.dumps(x, ensure_ascii=False) for x in obj) + "\n]\n"
    else:
        body = json.dumps(obj, indent=1, ensure_ascii=False) + "\n"
    _write(path, body.encode("utf-8"))


def _scene_json(scene: Scene) -> dict:
    frames = []
    for t in range(scene.num_frames):
        inst = {}
        for tr in scene.tracks:
            s = tr.states[t]
            if s is not None:
                inst[str(tr.instance_id)] = {"shape": s.shape, "color": s.color, "size": s.size,
                                             "x": round(s.x, 2), "y": round(s.y, 2),
                                             "region": scene.region(tr.instance_id, t)}
        frames.append({"timestamp": t + 1, "instances": inst})
    return {"id": scene.scene_id, "background": scene.background, "frames": frames,
            "events": [dataclasses.asdict(e) for e in scene.events]}


class _Writer:
    """Renders scenes into the temporary world directory and collects the annotation records."""

    def __init__(self, root: str, p: WorldParams):
        self.root, self.p = root, p
        self.truth: list[dict] = []  # one entry per scene, tagged with its set
        self._cache: dict = {}

    def scene(self, kind: str, index: int) -> Scene:
        rng = _rng(self.p.seed, _STREAMS[kind], index)
        if kind.endswith("images"):
            return sample_image_scene(rng, index, image_size=self.p.image_size)
        return sample_video_scene(rng, index, image_size=self.p.image_size,
                                  num_frames=(self.p.min_frames, self.p.max_frames))

    def frames(self, kind: str, scene: Scene) -> Iterator[tuple[int, render.RenderedFrame]]:
        """Render every frame, record the ground truth and write the label maps; yield (t, frame).

        A video frame whose objects did not change is the previous frame again (same object, so the
        marks are not re-rendered and its encoding is reused).
        """
        self.truth.append({"set": kind, **_scene_json(scene)})
        self._cache = {}
        prev_states, fr = None, None
        for t in range(scene.num_frames):
            states = tuple(tr.states[t] for tr in scene.tracks)
            if states != prev_states:
                fr, prev_states = render.render_frame(scene, t), states
            if kind.endswith("images"):
                mask_rel = os.path.join("masks", kind, f"{scene.scene_id:06d}.png")
            else:
                mask_rel = os.path.join("masks", kind, f"{scene.scene_id:06d}", f"{t + 1:03d}.png")
            _write(os.path.join(self.root, mask_rel), self._encoded(fr.label_map, ".png"))
            yield t, fr

    def _encoded(self, obj, suffix: str) -> bytes:
        """Encoding of a frame image or label map, remembered within a scene for repeated frames."""
        key = (id(obj), suffix)
        if key not in self._cache:
            data = render.encode_label_map(obj) if isinstance(obj, np.ndarray) else render.encode(obj, suffix)
            self._cache[key] = (obj, data)  # holding obj keeps its id from being reused
        return self._cache[key][1]

    def image(self, rel: str, image) -> None:
        _write(os.path.join(self.root, rel), self._encoded(image, os.path.splitext(rel)[1]))


def _training(w: _Writer) -> tuple[list, list, list, list]:
    p = w.p
    images, videos, stage1, stage2 = [], [], [], []
    deck1 = ann.LetterDeck(_rng(p.seed, _FILE_STREAMS["stage1"]))
    deck2 = ann.LetterDeck(_rng(p.seed, _FILE_STREAMS["stage2"]))
    for i in range(1, p.num_images + 1):
        scene = w.scene("images", i)
        for _, fr in w.frames("images", scene):
            w.image(f"images_vpt/{i:06d}.jpg", fr.marked)
            w.image(f"images_raw/{i:06d}.jpg", fr.raw)
        rng = _rng(p.seed, _STREAMS["images"] + 100, i)
        images.append(ann.inst_it_image(scene, f"images_vpt/{i:06d}.jpg"))
        qas = questions.sample_questions(scene, rng, questions.IMAGE_KINDS, 2)
        stage2.append(ann.qa_conversation(f"synthetic-image-{i:06d}", "image", f"images_vpt/{i:06d}.jpg", qas,
                                          "image", rng, deck2, STAGE2_FORMATS))
        with_caption = rng.random() < 0.5
        general = questions.sample_questions(scene, rng, questions.GENERAL_KINDS, 3 if with_caption else 4)
        caption = (CAPTION_REQUESTS[int(rng.integers(len(CAPTION_REQUESTS)))], text.plain_caption(scene))
        stage1.append(ann.qa_conversation(f"synthetic-general-{i:06d}", "image", f"images_raw/{i:06d}.jpg",
                                          general, "image", rng, deck1, STAGE1_FORMATS,
                                          leading=caption if with_caption else None))
    for j in range(1, p.num_videos + 1):
        scene = w.scene("videos", j)
        folder = f"videos_vpt/{j:06d}"
        names = []
        for t, fr in w.frames("videos", scene):
            names.append(f"{t + 1:03d}.jpg")
            w.image(f"{folder}/{names[-1]}", fr.marked)
        rng = _rng(p.seed, _STREAMS["videos"] + 100, j)
        qa_pairs = questions.sample_questions(scene, rng, questions.VIDEO_KINDS, int(rng.integers(4, 7)))
        videos.append(ann.inst_it_video(scene, folder, names, qa_pairs))
        qas = questions.sample_questions(scene, rng, questions.VIDEO_KINDS, 2)
        stage2.append(ann.qa_conversation(f"synthetic-video-{j:06d}", "video", folder, qas, "video", rng, deck2,
                                          STAGE2_FORMATS))
    return images, videos, stage1, stage2


def _bench(w: _Writer, bench_dir: str) -> tuple[dict, list[bench.BenchQuestion], list[bench.BenchQuestion]]:
    p = w.p
    image_qs, video_qs = [], []
    for i in range(1, p.bench_images + 1):
        scene = w.scene("bench_images", i)
        (_, fr), = list(w.frames("bench_images", scene))
        data = render.encode(fr.marked, f"{i:03d}.jpg")
        qas = questions.sample_questions(scene, _rng(p.seed, _STREAMS["bench_images"] + 100, i),
                                         questions.IMAGE_KINDS, p.bench_questions_per_image, need_choices=True)
        image_qs += [bench.BenchQuestion(f"{i:03d}-{k + 1:02d}", i, qa, image=(data, f"{i:03d}.jpg"))
                     for k, qa in enumerate(qas)]
    for j in range(1, p.bench_videos + 1):
        scene = w.scene("bench_videos", j)
        rel = f"videos_vpt/{j:03d}"
        for t, fr in w.frames("bench_videos", scene):
            w.image(f"bench/{rel}/{t + 1:03d}.jpg", fr.marked)
        qas = questions.sample_questions(scene, _rng(p.seed, _STREAMS["bench_videos"] + 100, j),
                                         questions.VIDEO_KINDS, p.bench_questions_per_video, need_choices=True)
        video_qs += [bench.BenchQuestion(f"{j:03d}-{k + 1:02d}", j, qa, video_path=rel) for k, qa in enumerate(qas)]
    summary = {}
    for split, qs in (("image", image_qs), ("video", video_qs)):
        if qs:
            summary[split] = bench.write_split(bench_dir, split, qs, _rng(p.seed, _FILE_STREAMS[f"bench_{split}"]))
    _write_json(os.path.join(bench_dir, "questions.json"),
                bench.question_index(image_qs, "image") + bench.question_index(video_qs, "video"))
    return summary, image_qs, video_qs


def _rendered(turn_lists: Iterator[tuple[str, list]]) -> Iterator[str]:
    template = get_template("vicuna_v1")
    for sample_id, turns in turn_lists:
        yield render_prompt(template, turns, add_generation_prompt=False, sample=sample_id)


def _llava_turns(records: list[dict]) -> Iterator[tuple[str, list]]:
    for r in records:
        yield r["id"], [(m["from"], m["value"]) for m in r["conversations"]]


def _inst_it_turns(images: list[dict], videos: list[dict]) -> Iterator[tuple[str, list]]:
    """The conversations the builder makes of the Inst-IT records (its default wording, seed 0)."""
    templates = instructions.Templates()
    for k, r in enumerate(images):
        item = instructions.image_item_id(r, k)
        for sample in instructions.image_samples(r, item=item, templates=templates, seed=0):
            yield sample.id, list(sample.turns)
    for k, r in enumerate(videos):
        item = instructions.video_item_id(r, k)
        for sample in instructions.video_samples(r, item=item, templates=templates, seed=0):
            yield sample.id, list(sample.turns)


def _corpus(images, videos, stage1, stage2, image_qs, video_qs) -> Iterator[str]:
    """All text the model will read or write, in a fixed order, rendered as vicuna_v1 chats: the LLaVA
    files, the builder's conversions of the Inst-IT records, and the bench prompts and answers."""
    yield from _rendered(_llava_turns(stage1))
    yield from _rendered(_llava_turns(stage2))
    yield from _rendered(_inst_it_turns(images, videos))
    template = get_template("vicuna_v1")
    for split, qs in (("image", image_qs), ("video", video_qs)):
        for q in qs:
            for fmt in ("mc", "oe"):
                choices = [q.qa.correct, *q.qa.distractors]
                turn = user_turn(split, fmt, q.qa.question, choices if fmt == "mc" else None)
                yield render_prompt(template, [("user", turn)], add_generation_prompt=True)
            yield q.qa.answer


def _token_stats(tok, records: list[dict]) -> dict:
    """Text tokens per conversation (visual tokens excluded), to size the loader's seq_len."""
    if not records:
        return {"conversations": 0}
    texts = _rendered(_llava_turns(records))
    lengths = np.array([len(tok(s, add_special_tokens=True)["input_ids"]) for s in texts])
    return {"conversations": len(records), "text_tokens_max": int(lengths.max()),
            "text_tokens_mean": round(float(lengths.mean()), 1),
            "text_tokens_p95": int(np.percentile(lengths, 95))}


def _file_hashes(root: str) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _generate(root: str, p: WorldParams) -> None:
    w = _Writer(root, p)
    images, videos, stage1, stage2 = _training(w)
    bench_dir = os.path.join(root, "bench")
    bench_summary, image_qs, video_qs = _bench(w, bench_dir)
    paths = WorldPaths.under(root)
    _write_json(paths.inst_it_image, images)
    _write_json(paths.inst_it_video, videos)
    _write_json(paths.llava_stage1, stage1)
    _write_json(paths.llava_stage2, stage2)
    _write_json(os.path.join(root, "ground_truth.json"), w.truth)

    tok = tokenizer.train_tokenizer(_corpus(images, videos, stage1, stage2, image_qs, video_qs), p.vocab_size)
    tokenizer.save_tokenizer(tok, paths.tokenizer_dir)

    hashes = _file_hashes(root)  # before the manifest exists
    manifest = {
        "generator": GENERATOR,
        "params": dataclasses.asdict(p),
        "counts": {
            "images": len(images), "videos": len(videos),
            "video_frames": sum(len(v["frame_level_caption"]) for v in videos),
            "video_qa_pairs": sum(len(v["question_answer_pairs"]) for v in videos),
            "llava_stage1": len(stage1), "llava_stage2": len(stage2),
            "bench_image_questions": len(image_qs), "bench_video_questions": len(video_qs),
        },
        "files": {f.name: os.path.relpath(getattr(paths, f.name), root)
                  for f in dataclasses.fields(WorldPaths) if f.name != "root"},
        "media_root": ".",
        "tokenizer": tokenizer.tokenizer_info(tok),
        "template": "vicuna_v1",
        "text_tokens": {"llava_stage1": _token_stats(tok, stage1), "llava_stage2": _token_stats(tok, stage2)},
        "bench": bench_summary,
        "sha256": hashes,
    }
    _write_json(paths.manifest, manifest)


def make_world(out_dir: str, *, overwrite: bool = False, **params) -> WorldPaths:
    """Generate the synthetic world into ``out_dir`` (or reuse it) and return its paths.

    ``params``: the fields of ``WorldParams`` (seed, num_images, num_videos, bench_images, bench_videos,
    image_size, min_frames, max_frames, bench_questions_per_image, bench_questions_per_video, vocab_size).
    """
    p = WorldParams(**params)
    p.check()
    out_dir = os.path.abspath(out_dir)
    paths = WorldPaths.under(out_dir)
    if os.path.exists(out_dir):
        if os.path.isfile(paths.manifest) and not overwrite:
            found = paths.read_manifest().get("params")
            if found == dataclasses.asdict(p):
                return paths
            diff = {k: (found.get(k) if isinstance(found, dict) else None, v)
                    for k, v in dataclasses.asdict(p).items() if not isinstance(found, dict) or found.get(k) != v}
            raise ValueError(f"{out_dir} holds a world with other parameters (found, wanted): {diff}; "
                             "pass overwrite=True (--overwrite) to replace it")
        if os.listdir(out_dir) and not overwrite:
            raise ValueError(f"{out_dir} exists, is not empty and has no {MANIFEST}; pass overwrite=True")
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _generate(tmp, p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return paths
