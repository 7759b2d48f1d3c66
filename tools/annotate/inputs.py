"""Input readers: COCO instances JSON (images), YouTube-VIS-style JSON (videos), frame sampling.

Masks may be COCO RLE (compressed string or uncompressed counts), polygons, or boxes only.
Videos are either folders of frames (``file_names``) or a video file (``video_file``) decoded with PyAV.
Instance ids presented to GPT are 1..N: for images ordered by area (largest first, SoM convention),
for videos by track (annotation) id so each id is stable across all frames of the video.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


# ----------------------------------------------------------------------------- mask decoding
def rle_string_to_counts(s: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string (LEB128-like, 6 bits per char, offset 48, delta coded)."""
    if isinstance(s, str):
        s = s.encode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        x = 0
        k = 0
        more = True
        while more:
            c = s[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def counts_to_rle_string(counts: list[int]) -> str:
    """Inverse of :func:`rle_string_to_counts` (used to make test fixtures)."""
    out = bytearray()
    for i, c in enumerate(counts):
        x = int(c)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = not ((x == 0 and not (ch & 0x10)) or (x == -1 and (ch & 0x10)))
            if more:
                ch |= 0x20
            out.append(ch + 48)
    return out.decode("ascii")


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = rle_string_to_counts(counts)
    flat = np.zeros(h * w, dtype=bool)
    pos = 0
    val = False
    for c in counts:
        c = int(c)
        if val:
            flat[pos:pos + c] = True
        pos += c
        val = not val
    return flat.reshape((w, h)).T.copy()  # column-major (Fortran) order


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed-string COCO RLE of a boolean mask (test fixtures)."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    counts: list[int] = []
    val = False
    run = 0
    for v in flat:
        if bool(v) == val:
            run += 1
        else:
            counts.append(run)
            run = 1
            val = not val
    counts.append(run)
    return {"size": [h, w], "counts": counts_to_rle_string(counts)}


def polygons_to_mask(polys: list[list[float]], h: int, w: int) -> np.ndarray:
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for poly in polys:
        pts = [(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)]
        if len(pts) >= 3:
            draw.polygon(pts, fill=1, outline=1)
    return np.asarray(img, dtype=np.uint8).astype(bool)


def box_to_mask(box: list[float], h: int, w: int) -> np.ndarray:
    x, y, bw, bh = (float(v) for v in box)
    m = np.zeros((h, w), dtype=bool)
    x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
    x1, y1 = min(w, int(round(x + bw))), min(h, int(round(y + bh)))
    m[y0:y1, x0:x1] = True
    return m


def decode_segmentation(seg: Any, bbox: Any, h: int, w: int) -> np.ndarray | None:
    """A COCO-style segmentation (RLE dict, polygon list) or, failing that, a box → boolean mask."""
    if isinstance(seg, dict) and "counts" in seg:
        m = decode_rle(seg)
        if m.shape != (h, w):
            raise ValueError(f"RLE size {m.shape} != image size {(h, w)}")
        return m
    if isinstance(seg, list) and seg:
        return polygons_to_mask(seg, h, w)
    if bbox:
        return box_to_mask(bbox, h, w)
    return None


# ----------------------------------------------------------------------------- items
@dataclasses.dataclass
class Frame:
    name: str                          # frame_name written to the Inst-IT JSON
    loader: Any                        # callable () -> HxWx3 uint8 array
    masks: dict[int, np.ndarray]       # instance id (1..N) -> boolean mask
    raw_copy: bool = False             # decoded from a video file: the tool also saves the raw frame


@dataclasses.dataclass
class Item:
    kind: str                          # "image" | "video"
    item_id: int
    path: str                          # image_path / video_path written to the JSON
    frames: list[Frame]


def _image_loader(path: str):
    def load() -> np.ndarray:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    return load


def load_coco(json_path: str, image_root: str) -> list[Item]:
    with open(json_path) as f:
        data = json.load(f)
    anns_by_img: dict[int, list[dict]] = {}
    for a in data.get("annotations", []):
        anns_by_img.setdefault(int(a["image_id"]), []).append(a)
    items = []
    for img in sorted(data["images"], key=lambda r: int(r["id"])):
        h, w = int(img["height"]), int(img["width"])
        decoded = []
        for a in anns_by_img.get(int(img["id"]), []):
            m = decode_segmentation(a.get("segmentation"), a.get("bbox"), h, w)
            if m is not None and m.any():
                decoded.append((-int(m.sum()), int(a.get("id", 0)), m))
        decoded.sort(key=lambda t: (t[0], t[1]))  # area descending, then annotation id
        masks = {i + 1: m for i, (_, _, m) in enumerate(decoded)}
        fpath = os.path.join(image_root, img["file_name"])
        items.append(Item("image", int(img["id"]), img["file_name"],
                          [Frame(os.path.basename(img["file_name"]), _image_loader(fpath), masks)]))
    return items


def sample_indices(n_total: int, num_frames: int) -> list[int]:
    """Uniform sampling of ``num_frames`` (≤ 32) indices out of ``n_total``; all if fewer."""
    num_frames = max(1, min(int(num_frames), 32))
    if n_total <= num_frames:
        return list(range(n_total))
    return [int(round(x)) for x in np.linspace(0, n_total - 1, num_frames)]


def decode_video_frames(path: str, indices: list[int]) -> dict[int, np.ndarray]:
    """Decode the requested frame indices of a video file with PyAV."""
    import av  # local import: only needed for video files

    want = set(indices)
    out: dict[int, np.ndarray] = {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in want:
                out[i] = frame.to_ndarray(format="rgb24")
            if len(out) == len(want):
                break
    return out


def count_video_frames(path: str) -> int:
    import av

    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


def load_ytvis(json_path: str, media_root: str, num_frames: int = 8, sampling: str = "uniform") -> list[Item]:
    """YouTube-VIS-style JSON: ``videos[{id, file_names | video_file | frame_dir, height, width}]``,
    ``annotations[{id, video_id, segmentations[per frame: RLE | polygon | null], bboxes[...]}]``.

    ``sampling``: "uniform" (``num_frames`` evenly spaced frames) or "annotated" (frames where at least one
    track has a mask/box, uniformly thinned to ``num_frames``)."""
    with open(json_path) as f:
        data = json.load(f)
    tracks: dict[int, list[dict]] = {}
    for a in data.get("annotations", []):
        tracks.setdefault(int(a["video_id"]), []).append(a)
    items = []
    for vid in sorted(data["videos"], key=lambda r: int(r["id"])):
        h, w = int(vid["height"]), int(vid["width"])
        vtracks = sorted(tracks.get(int(vid["id"]), []), key=lambda a: int(a["id"]))
        video_file = None
        if vid.get("file_names"):
            names = list(vid["file_names"])
            video_path = os.path.dirname(names[0])  # "" if the frames sit directly in the media root
        elif vid.get("frame_dir"):
            d = os.path.join(media_root, vid["frame_dir"])
            names = [os.path.join(vid["frame_dir"], n) for n in sorted(os.listdir(d))
                     if n.lower().endswith((".jpg", ".jpeg", ".png"))]
            video_path = vid["frame_dir"]
        elif vid.get("video_file"):
            video_file = os.path.join(media_root, vid["video_file"])
            n = int(vid.get("length") or count_video_frames(video_file))
            stem = os.path.splitext(os.path.basename(vid["video_file"]))[0]
            names = [f"{stem}_{i:05d}.jpg" for i in range(n)]
            video_path = os.path.splitext(vid["video_file"])[0]  # frames go to <root>/<video_path>/<name>
        else:
            raise ValueError(f"video {vid['id']}: needs file_names, frame_dir or video_file")
        n_total = len(names)
        candidates = list(range(n_total))
        if sampling == "annotated":
            candidates = [t for t in candidates if any(
                (a.get("segmentations") or [None] * n_total)[t] or (a.get("bboxes") or [None] * n_total)[t]
                for a in vtracks)]
        elif sampling != "uniform":
            raise ValueError(f"unknown sampling {sampling!r}")
        picked = [candidates[i] for i in sample_indices(len(candidates), num_frames)] if candidates else []
        decoded = decode_video_frames(video_file, picked) if video_file else None
        frames = []
        for t in picked:
            masks = {}
            for k, a in enumerate(vtracks, start=1):  # id k is the same on every frame of the video
                segs = a.get("segmentations") or []
                boxes = a.get("bboxes") or []
                seg = segs[t] if t < len(segs) else None
                box = boxes[t] if t < len(boxes) else None
                m = decode_segmentation(seg, box, h, w)
                if m is not None and m.any():
                    masks[k] = m
            if decoded is not None:
                arr = decoded[t]
                loader = (lambda a=arr: a)
            else:
                loader = _image_loader(os.path.join(media_root, names[t]))
            frames.append(Frame(os.path.basename(names[t]), loader, masks, raw_copy=decoded is not None))
        items.append(Item("video", int(vid["id"]), video_path, frames))
    return items
