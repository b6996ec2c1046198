"""Tools: the standalone inference config and Zoo zip, weights' sha256 into large_files.yml, demo training."""
