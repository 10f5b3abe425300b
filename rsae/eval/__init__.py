"""Evaluation: torchmetrics metrics, the spliced cross-entropy, sparse probing, the test run, reports, plots.

Import the modules themselves (`rsae.eval.metrics`, `rsae.eval.report`, ...): this package file imports nothing.
"""
