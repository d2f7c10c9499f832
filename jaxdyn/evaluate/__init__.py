"""Evaluation: perplexity / bits per byte on a corpus and the lm-evaluation-harness adapter."""
