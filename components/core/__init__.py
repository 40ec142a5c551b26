"""The small core every part uses: params (config), the graph read from dvc.yaml, atomic artifacts, errors."""
