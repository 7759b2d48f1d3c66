"""Published Inst-IT Bench results (Inst-IT paper, NeurIPS 2025 / arXiv 2412.03565v3, Table 2; rows marked
"page" only on the project page). Columns: image OE, image MC, video OE, video MC (None = not reported)."""

from __future__ import annotations

COLUMNS = (("image", "oe"), ("image", "mc"), ("video", "oe"), ("video", "mc"))
COLUMN_TITLES = {("image", "oe"): "Image OE", ("image", "mc"): "Image MC",
                 ("video", "oe"): "Video OE", ("video", "mc"): "Video MC"}

# (model, LLM, #IT samples, (image OE, image MC, video OE, video MC))
PUBLISHED = (
    ("Random guess", "–", "–", (None, 25.0, None, 25.0)),
    ("GPT-4o", "–", "N/A", (74.1, 84.8, 65.5, 81.0)),
    ("Gemini-1.5-pro (page)", "–", "N/A", (69.9, 79.7, 61.4, 76.7)),
    ("Gemini-1.5-flash", "–", "N/A", (65.3, 79.5, 57.9, 75.8)),
    ("LLaVA-1.5", "Vicuna-7B", "665K", (41.6, 32.1, None, None)),
    ("ViP-LLaVA", "Vicuna-7B", "~1.2M", (42.1, 29.2, None, None)),
    ("SoM-LLaVA", "Vicuna-7B", "695K", (45.1, 40.0, None, None)),
    ("LLaVA-NeXT", "Vicuna-7B", "765K", (46.0, 42.4, None, None)),
    ("LLaVA-NeXT-Video", "Vicuna-7B", "860K", (46.5, 39.5, 25.8, 24.8)),
    ("ShareGPT4Video", "Llama3-8B", "~1.0M", (43.2, 48.7, 27.8, 16.1)),
    ("MiniCPM-V 2.6 (page)", "Qwen2-7B", "~7.0M", (57.6, 66.8, 40.0, 45.2)),
    ("LLaVA-OV (SI)", "Qwen2-7B", "~7.2M", (60.3, 61.8, 31.4, 36.4)),
    ("LLaVA-OV", "Qwen2-7B", "~8.8M", (48.0, 71.7, 33.2, 45.6)),
    ("LLaVA-Video", "Qwen2-7B", "~7.4M", (45.1, 67.0, 34.1, 53.2)),
    ("InternVL2", "InternLM2.5-7B", "N/A", (58.6, 66.5, 39.8, 45.5)),
    ("Qwen2-VL-Instruct", "Qwen2-7B", "N/A", (48.3, 64.9, 38.2, 59.4)),
    ("Qwen2-VL-Instruct", "Qwen2-72B", "N/A", (55.5, 74.7, 45.5, 74.6)),
    ("LLaVA-NeXT-Inst-IT", "Vicuna-7B", "920K", (68.6, 63.0, 49.3, 42.1)),
    ("LLaVA-NeXT-Inst-IT", "Qwen2-7B", "920K", (67.9, 75.3, 45.7, 53.3)),
)

# Rows drawn beside ours in the chart: the two Inst-IT models and their LLaVA-NeXT(-Video) baseline.
CHART_ROWS = (("LLaVA-NeXT-Video", "Vicuna-7B"), ("LLaVA-NeXT-Inst-IT", "Vicuna-7B"),
              ("LLaVA-NeXT-Inst-IT", "Qwen2-7B"))
