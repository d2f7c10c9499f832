"""Experiment configs: one commented file per experiment, presets chosen by `:preset`."""
