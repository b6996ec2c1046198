"""Inputs and outputs: input records and checks, datalists, input transforms, the weights format, the
out-of-distribution check, results folders, atomic files, the counterfactual writer and pictures.
"""
