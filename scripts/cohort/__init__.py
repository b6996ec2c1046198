"""Synthetic cohorts with an exact oracle: the causal model, the cartoon brain and chest phantoms, the real-anatomy
MNI152 brain, rendering and the oracle's counterfactual, cohort files, summaries and oracle scoring.
"""
