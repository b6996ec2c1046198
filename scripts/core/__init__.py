"""The method: Latent Drift (drift.py), the network component (networks.py), the covariate schema and encoder
(covariates.py), the method's transforms (transforms.py: latent encoding, condition dropout, drift noising), drifted
sampling and inversion (sampling.py), the counterfactual inferer with its reference chain, composition and edit mask
(inferers.py) and the paired (longitudinal) mode (paired.py).
"""
