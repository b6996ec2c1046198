"""Apps serving the bundle: MONAI Label (monailabel_app/) and MONAI Deploy (deploy_app/)."""
