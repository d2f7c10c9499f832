"""Experiment-config plumbing: locate, load, override and check `configs/<exp>.py` files."""
