"""Synthetic COCO / YouTube-VIS inputs for the annotate-tool tests (small images, overlapping masks)."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from tools.annotate.inputs import encode_rle

H, W = 72, 96


def _bg(seed: int) -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([(x * 2 + seed * 30) % 256, (y * 3) % 256, np.full_like(x, 90 + seed)], -1)
    return img.astype(np.uint8)


def ellipse(cy, cx, ry, rx) -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def make_coco(root: str) -> tuple[str, str]:
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    images, anns = [], []
    for k in (1, 2):
        name = f"img{k}.png"
        Image.fromarray(_bg(k)).save(os.path.join(img_dir, name))
        images.append({"id": 100 + k, "file_name": name, "height": H, "width": W})
    m = ellipse(30, 40, 20, 30)
    anns.append({"id": 1, "image_id": 101, "segmentation": encode_rle(m), "bbox": [10, 10, 60, 40]})
    anns.append({"id": 2, "image_id": 101, "segmentation": [[50, 20, 90, 20, 90, 60, 50, 60]],
                 "bbox": [50, 20, 40, 40]})
    anns.append({"id": 3, "image_id": 101, "bbox": [5, 45, 20, 20]})  # box only
    anns.append({"id": 4, "image_id": 102, "segmentation": [[0, 0, 60, 0, 60, 50, 0, 50]], "bbox": [0, 0, 60, 50]})
    anns.append({"id": 5, "image_id": 102, "segmentation": encode_rle(ellipse(40, 60, 15, 20)),
                 "bbox": [40, 25, 40, 30]})
    path = os.path.join(root, "coco.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}, f)
    return path, img_dir


def make_ytvis(root: str, n_frames: int = 10) -> tuple[str, str]:
    vdir = os.path.join(root, "videos", "vid7")
    os.makedirs(vdir, exist_ok=True)
    names, seg_a, seg_b, box_c = [], [], [], []
    for t in range(n_frames):
        name = f"vid7/{t:05d}.png"
        Image.fromarray(_bg(t)).save(os.path.join(root, "videos", name))
        names.append(name)
        seg_a.append(encode_rle(ellipse(30, 20 + 4 * t, 14, 16)))
        seg_b.append([[60, 10, 90, 10, 90, 50, 60, 50]] if t % 3 else None)  # absent on some frames
        box_c.append([10, 50, 30, 15])
    anns = [
        {"id": 11, "video_id": 7, "segmentations": seg_a, "bboxes": [None] * n_frames},
        {"id": 12, "video_id": 7, "segmentations": seg_b, "bboxes": [None] * n_frames},
        {"id": 13, "video_id": 7, "segmentations": [None] * n_frames, "bboxes": box_c},
    ]
    path = os.path.join(root, "ytvis.json")
    with open(path, "w") as f:
        json.dump({"videos": [{"id": 7, "file_names": names, "height": H, "width": W, "length": n_frames}],
                   "annotations": anns}, f)
    return path, os.path.join(root, "videos")
