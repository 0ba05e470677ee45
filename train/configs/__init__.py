"""Experiment configs: ``default.py`` and one file per recipe that imports it and overrides."""
