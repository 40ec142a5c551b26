"""Training libraries: model building and backbones, the fit loop, what trains per phase, weight downloads, the baseline."""
