"""Benchmark scorers: exact-match short answers (`scoring`) and POPE object probing (`pope`)."""
