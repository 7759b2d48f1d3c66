"""Inst-IT Bench evaluation: `run` (predictions), `score` (MC rules / OE judge), `report`.

Python API: `instit_jax.eval.run.run_bench`, `instit_jax.eval.scoring.{extract_choice, score_mc, score_oe}`,
`instit_jax.eval.rule_judge.judge_rule` (no API key; not the official metric),
`instit_jax.eval.gpt_judge.judge_gpt`, `instit_jax.eval.report.write_report`.
"""
