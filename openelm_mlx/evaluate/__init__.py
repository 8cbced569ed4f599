"""Evaluation: perplexity and KL (perplexity.py), log-likelihood scoring (scoring.py), the cloze check (cloze.py),
the lm-eval-harness adapter (harness.py, needs the `eval` extra), the paper's table (paper.py), results (report.py)."""
