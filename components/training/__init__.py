"""Training libraries: model building and the backbone registry, the fit loop, weight downloads, the baseline."""
