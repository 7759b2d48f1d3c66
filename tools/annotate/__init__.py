"""Offline GPT-4o Set-of-Marks annotation tool producing Inst-IT-format data (issue 6).

Run as ``python -m tools.annotate --help``.
"""
