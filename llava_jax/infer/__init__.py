"""Inference: the generation engine (generate.py), sampling (sampling.py) and the generate/chat commands."""
