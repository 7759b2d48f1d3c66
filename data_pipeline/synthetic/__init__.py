"""A synthetic instance world for the embedded demo (issue 8): seeded, byte-deterministic, seconds on CPU.

Scenes of simple shapes (``world``) are rendered with ground-truth masks and Set-of-Marks overlays by
the annotation tool's renderer (``render``), described by templates in the Inst-IT Dataset format and as
LLaVA conversations (``text``, ``questions``, ``annotations``), turned into a held-out bench in the
Inst-IT Bench layout (``bench``), and given a small tokenizer trained on their text (``tokenizer``).
``make_world`` (``build``) writes it all; ``python -m data_pipeline.synthetic`` is the command line.
See docs/synthetic.md.
"""

from data_pipeline.synthetic.build import WorldParams, WorldPaths, make_world

__all__ = ["WorldParams", "WorldPaths", "make_world"]
