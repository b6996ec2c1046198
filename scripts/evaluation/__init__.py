"""Evaluation against the oracle: the evaluators (predictor, segmenter), metrics, compositions, reports and the δ
search.
"""
