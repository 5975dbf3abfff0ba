"""Evaluation: exact and sliding-window perplexity, the lm-eval harness (`hmamba.eval.harness`, `--model hmamba`
in `hmamba.eval.lm`) and the speed benchmark (`hmamba.eval.bench`). Importing this package does not import
lm-eval."""

from .perplexity import perplexity, sliding_window_perplexity, text_perplexity

__all__ = ["perplexity", "sliding_window_perplexity", "text_perplexity"]
