"""Evaluation: scoring every test pair, the per-pair metrics, statistics between methods, leaderboards."""
