"""The three Inst-IT GPT-4o prompts (frame, video summary, open-ended QA) and message builders."""

from __future__ import annotations

import base64

PROMPT_VERSION = "instit-prompts-v1"

FRAME_SYSTEM = """# Task Description: You are an expert in video analysis, skilled at detecting dynamic changes between consecutive video frames. In this task, you are given two consecutive frames. Each image contains objects with unique numeric IDs (referred to as "marked objects"). Your task is to:
- Provide object-level descriptions for each marked object in the current frame.
- Provide a dense and detailed image-level description for the entire current frame.
- Identify any dynamic changes or differences between the current frame and the previous frame.
# Guidelines for Object-level Descriptions:
- Describe each marked object's appearance in the current frame, focus on attributes like color, shape, texture, size.
- If you are confident, specify the category to which the object belongs in the description, i.e., answer what the object is.
# Guidelines for Image-level Descriptions:
- Mention all the marked objects in the current frame, focusing on the behaviors, movements, states, positions, and other dynamic information.
- Describe the interactions between the objects, as well as the background, environment, perspective, and angle of the shot.
# Guidelines for Describe the Temporal Changes:
- Highlight changes in each marked object, such as movements, actions, status, position, as well as object interactions or relationships.
- Note any changes in the background, environment, camera angles and scene transitions.
- Reasonably infer the causes of the changes, trends, and possible impacts.
# Constraints:
- Accuracy is critical: If a marked object is too small or obscured, and you cannot confidently identify it, skip it without attempting to describe it.
- Frame of reference: Describe movement direction, or object position from the camera's point of view.
- Specify what the interaction is, do not simply say "[1] is interacting with [2]", you should say "[1] is catching [2]".
- Object Referring Format: When referring to a single object, use the format: [1]; when listing multiple objects, use the format: "[1] [2] [3]".
# Structured Output: Your output should have three sections:
- instance_level: for each marked object in the current frame, its id and a comprehensive description of its appearance.
- image_level: a dense and comprehensive description of the entire current image, capturing as many details as possible.
- temporal_change: changes and differences compared to the previous frame, highlighting important transitions or events; null if this is the first frame.
# Input: You will receive two consecutive images: <the previous frame image> <the current frame image>"""

IMAGE_NOTE = ("This is a single image (no previous frame): describe the marked objects and the image; "
              "set temporal_change to null.")

VIDEO_SYSTEM = """You are an expert in summarizing video content. You will receive frame-by-frame text descriptions of a video, in chronological order. Aggregate them into an accurate, cohesive summary of the entire video.
- Base your description solely on the input; do not mention content that is not described.
- Single-frame descriptions may be inaccurate; use the overall context to correct them.
- Describe events in chronological order, with timestamps: <3> for a moment and <5>-<7> for an interval.
- Refer to objects as [ID]; several objects as [ID1] [ID2].
Output: a dense, detailed and accurate description of the entire video (video_level_caption)."""

QA_SYSTEM = """You are an expert in video content analysis. From the frame descriptions of a video, generate high-quality, contextually coherent questions and accurate answers.
- Do not ask speculative questions: every question must be answerable from the descriptions.
- Diversify the question types (who / what / where / when / how / why).
- Produce 10 to 20 QA pairs depending on the information content; avoid redundant or overly simple questions.
- Write timestamps enclosed in <>, e.g. <3> or <5>-<7>; refer to objects as [ID] or [ID1] [ID2].
Output: question_answer_pairs, a list of {question, answer}."""


def data_url(data: bytes) -> str:
    mime = "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def ids_text(ids) -> str:
    return " ".join(f"[{i}]" for i in sorted(ids)) or "(none)"


def frame_messages(prev_png: bytes | None, cur_png: bytes, timestamp: int, ids, detail: str,
                   is_image: bool) -> list[dict]:
    content: list[dict] = []
    if is_image:
        content.append({"type": "text", "text": IMAGE_NOTE})
    elif prev_png is None:
        content.append({"type": "text", "text": "This is the first frame: there is no previous frame; "
                                                "set temporal_change to null."})
    else:
        content.append({"type": "text", "text": f"Previous frame <{timestamp - 1}>:"})
        content.append({"type": "image_url", "image_url": {"url": data_url(prev_png), "detail": detail}})
    content.append({"type": "text", "text": f"Current frame <{timestamp}>. Marked objects in the current "
                                            f"frame: {ids_text(ids)}"})
    content.append({"type": "image_url", "image_url": {"url": data_url(cur_png), "detail": detail}})
    return [{"role": "system", "content": FRAME_SYSTEM}, {"role": "user", "content": content}]


def _frame_lines(frames: list[dict], with_instances: bool) -> str:
    lines = []
    for fr in frames:
        parts = [f"Timestamp: <{fr['timestamp']}>"]
        if with_instances:
            inst = "; ".join(f"[{k}] {v}" for k, v in fr["instance_level"].items())
            parts.append(f"Instance-level description: {inst}")
        parts.append(f"Frame-level description: {fr['image_level']}")
        parts.append(f"Temporal changes: {fr['temporal_change'] or 'None, as this is the first frame'}")
        lines.append("; ".join(parts))
    return "\n".join(lines)


def video_messages(frames: list[dict], ids, timestamps) -> list[dict]:
    text = (f"Objects: {ids_text(ids)}. Timestamps: {' '.join(f'<{t}>' for t in timestamps)}.\n"
            + _frame_lines(frames, with_instances=True))
    return [{"role": "system", "content": VIDEO_SYSTEM}, {"role": "user", "content": text}]


def qa_messages(frames: list[dict], ids, timestamps) -> list[dict]:
    text = (f"Objects: {ids_text(ids)}. Timestamps: {' '.join(f'<{t}>' for t in timestamps)}.\n"
            + _frame_lines(frames, with_instances=False))
    return [{"role": "system", "content": QA_SYSTEM}, {"role": "user", "content": text}]


def repair_message(problems: list[str]) -> dict:
    return {"role": "user", "content": "Your previous answer was invalid:\n- " + "\n- ".join(problems)
            + "\nAnswer again, fixing these problems, in the same structured format."}
