"""Experiments: the fine-tuning ablation and the benchmark."""
