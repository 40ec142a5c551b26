"""Data libraries: image IO and checks, CSV manifests, the cleaned dataset reader, drift, expectations."""
