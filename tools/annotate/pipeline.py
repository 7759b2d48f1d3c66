"""Orchestration: render marks, plan GPT requests in the paper's order, run them, assemble Inst-IT JSON."""

from __future__ import annotations

import asyncio
import dataclasses
import os

from PIL import Image

from tools.annotate import marks, prompts, schema
from tools.annotate.client import (Annotator, Cache, CallConfig, Report, Request, atomic_write,
                                   atomic_write_json, estimate_prompt_tokens, price_for, request_key)
from tools.annotate.inputs import Item

IMAGE_FILE = "inst_it_image.json"
VIDEO_FILE = "inst_it_video.json"


@dataclasses.dataclass
class RunConfig:
    out_dir: str
    detail: str = "high"
    alpha: float = 0.25
    min_qa: int = 10
    max_qa: int = 20
    price_in: float | None = None
    price_out: float | None = None


class Pipeline:
    def __init__(self, items: list[Item], run: RunConfig, call: CallConfig):
        self.items, self.run_cfg, self.call = items, run, call
        self.cache = Cache(os.path.join(run.out_dir, "cache"))
        pin, pout = price_for(call.model)
        self.report = Report(call.model, run.price_in if run.price_in is not None else pin,
                             run.price_out if run.price_out is not None else pout)

    # ------------------------------------------------------------------ marks
    @staticmethod
    def rel_path(item: Item, t: int) -> str:
        """Where a frame lives relative to a media root, as the Inst-IT JSON names it: ``image_path`` for
        images, ``video_path/frame_name`` for video frames. Marked frames mirror it under ``out/marked/``
        (so ``out/marked`` is the SoM media root for ``data_pipeline.build``)."""
        rel = item.path if item.kind == "image" else os.path.join(item.path, item.frames[t].name)
        rel = os.path.normpath(rel)
        if os.path.isabs(rel) or rel.startswith(".."):
            raise ValueError(f"{item.kind} {item.item_id}: path {rel!r} escapes the media root")
        return rel

    def marked_path(self, item: Item, t: int) -> str:
        return os.path.join(self.run_cfg.out_dir, "marked", self.rel_path(item, t))

    def render_all(self) -> None:
        sheet = []
        for item in self.items:
            entries = []
            for t, fr in enumerate(item.frames):
                path = self.marked_path(item, t)
                if not os.path.exists(path):  # rendering is deterministic: an existing file is identical
                    raw = fr.loader()
                    if fr.raw_copy:  # frames decoded from a video file: keep the raw frame too
                        raw_path = os.path.join(self.run_cfg.out_dir, "raw", self.rel_path(item, t))
                        atomic_write(raw_path, marks.encode_for(raw_path, Image.fromarray(raw)))
                    img = marks.render_marks(raw, fr.masks, alpha=self.run_cfg.alpha)
                    atomic_write(path, marks.encode_for(path, img))
                entries.append((f"<{t + 1}> {fr.name}: {prompts.ids_text(fr.masks)}",
                                os.path.relpath(path, self.run_cfg.out_dir)))
            sheet.append((f"{item.kind} {item.item_id}: {item.path}", entries))
        marks.write_contact_sheet(os.path.join(self.run_cfg.out_dir, "contact_sheet.html"), sheet)

    def png(self, item: Item, t: int) -> bytes:
        with open(self.marked_path(item, t), "rb") as f:
            return f.read()

    # ------------------------------------------------------------------ requests
    def _req(self, label, messages, model_cls, validate) -> Request:
        key = request_key(self.call.model, messages, model_cls, self.call.params())
        return Request(key, label, messages, model_cls, validate)

    def frame_requests(self, item: Item) -> list[Request]:
        reqs = []
        for t, fr in enumerate(item.frames):
            ids = set(fr.masks)
            prev = self.png(item, t - 1) if (item.kind == "video" and t > 0) else None
            msgs = prompts.frame_messages(prev, self.png(item, t), t + 1, ids, self.run_cfg.detail,
                                          is_image=item.kind == "image")
            first = item.kind == "image" or t == 0
            ts = set(range(1, len(item.frames) + 1)) if item.kind == "video" else set()
            reqs.append(self._req(f"{item.kind} {item.item_id} frame <{t + 1}>", msgs, schema.FrameAnnotation,
                                  lambda a, ids=ids, first=first, ts=ts: schema.validate_frame(a, ids, first, ts)))
        return reqs

    def frame_records(self, item: Item, results: list[dict]) -> list[dict]:
        recs = []
        for t, (fr, res) in enumerate(zip(item.frames, results)):
            inst = {str(c["id"]): c["caption"] for c in sorted(res["instance_level"], key=lambda c: c["id"])}
            recs.append({"timestamp": t + 1, "frame_name": fr.name, "instance_level": inst,
                         "image_level": res["image_level"],
                         "temporal_change": None if t == 0 else res["temporal_change"]})
        return recs

    def video_requests(self, item: Item, frames: list[dict]) -> list[Request]:
        ids = set().union(*[set(fr.masks) for fr in item.frames]) if item.frames else set()
        ts = [f["timestamp"] for f in frames]
        lo, hi = self.run_cfg.min_qa, self.run_cfg.max_qa
        return [
            self._req(f"video {item.item_id} summary", prompts.video_messages(frames, ids, ts),
                      schema.VideoSummary, lambda s: schema.validate_summary(s, ids, set(ts))),
            self._req(f"video {item.item_id} qa", prompts.qa_messages(frames, ids, ts), schema.QASet,
                      lambda q: schema.validate_qa(q, ids, set(ts), lo, hi)),
        ]

    def pending_requests(self):
        """Yield, in item order, the requests not yet cached whose inputs are available (used by --batch,
        stage by stage: frames first, then a video's summary and QA once all its frames are cached)."""
        for item in self.items:
            freqs = self.frame_requests(item)
            missing = [r for r in freqs if not self.cache.has(r.key)]
            if missing:
                yield from missing
            elif item.kind == "video":
                res = [self.cache.get(r.key)["result"] for r in freqs]
                yield from (r for r in self.video_requests(item, self.frame_records(item, res))
                            if not self.cache.has(r.key))

    # ------------------------------------------------------------------ live run
    async def annotate_item(self, ann: Annotator, item: Item) -> dict | None:
        results = await asyncio.gather(*[ann.run(r) for r in self.frame_requests(item)])
        if any(r is None for r in results):
            return None
        frames = self.frame_records(item, list(results))
        if item.kind == "image":
            f = frames[0]
            return {"image_id": item.item_id, "instance_level_caption": f["instance_level"],
                    "image_level_caption": f["image_level"], "image_path": item.path}
        summary, qa = await asyncio.gather(*[ann.run(r) for r in self.video_requests(item, frames)])
        if summary is None or qa is None:
            return None
        return {"video_id": item.item_id, "frame_level_caption": frames,
                "question_answer_pairs": qa["question_answer_pairs"],
                "video_level_caption": summary["video_level_caption"], "video_path": item.path}

    async def run_live(self, base_url: str | None) -> dict:
        ann = Annotator(self.call, self.cache, self.report, base_url)
        # bound the items in flight so a large dataset never holds all its encoded images in memory
        items_sem = asyncio.Semaphore(max(4, 2 * self.call.concurrency))

        async def one(it: Item):
            async with items_sem:
                return await self.annotate_item(ann, it)

        try:
            records = await asyncio.gather(*[one(it) for it in self.items])
        finally:
            await ann.close()
        return self.write_outputs(records)

    def write_outputs(self, records: list[dict | None]) -> dict:
        images = sorted((r for r in records if r and "image_id" in r), key=lambda r: r["image_id"])
        videos = sorted((r for r in records if r and "video_id" in r), key=lambda r: r["video_id"])
        out = self.run_cfg.out_dir
        if any(it.kind == "image" for it in self.items):
            atomic_write_json(os.path.join(out, IMAGE_FILE), images)
        if any(it.kind == "video" for it in self.items):
            atomic_write_json(os.path.join(out, VIDEO_FILE), videos)
        failed = [f"{it.kind} {it.item_id}" for it, r in zip(self.items, records) if r is None]
        rep = self.report.to_dict()
        rep.update({"items": len(self.items), "items_ok": len(images) + len(videos), "items_failed": failed})
        atomic_write_json(os.path.join(out, "report.json"), rep)
        return rep

    # ------------------------------------------------------------------ dry run
    def dry_run(self, frame_out_tokens: int = 700, summary_out: int = 600, qa_out: int = 1200) -> dict:
        """Token and dollar estimate with no network calls (GPT-4o image-token formula, chars/4 text)."""
        n_calls = prompt = completion = 0
        per_frame_text = frame_out_tokens  # frame annotations are the input of the video-level calls
        for item in self.items:
            for r in self.frame_requests(item):
                n_calls += 1
                prompt += estimate_prompt_tokens(r.messages)
                completion += frame_out_tokens
            if item.kind == "video":
                sys_tokens = (len(prompts.VIDEO_SYSTEM) + len(prompts.QA_SYSTEM)) // 4
                n_calls += 2
                prompt += sys_tokens + 2 * per_frame_text * len(item.frames)
                completion += summary_out + qa_out
        pin, pout = self.report.price_in, self.report.price_out
        std = (prompt * pin + completion * pout) / 1e6
        est = {"dry_run": True, "model": self.call.model, "items": len(self.items), "calls": n_calls,
               "prompt_tokens": prompt, "completion_tokens": completion,
               "cost_usd_standard": round(std, 4), "cost_usd_batch": round(std * self.report.batch_discount, 4),
               "cached_calls": sum(self.cache.has(r.key) for it in self.items for r in self.frame_requests(it))}
        atomic_write_json(os.path.join(self.run_cfg.out_dir, "dry_run.json"), est)
        return est
