"""tlpipe: transfer learning for image classifiers, run as the DVC graph in dvc.yaml.

This folder holds the stage modules dvc.yaml names, one per stage (`tlpipe stages` lists them), each
with `run(params)`: thin (read inputs, call libraries, write outputs), and never importing another
stage. The libraries live in subpackages by role: core (params, the graph, atomic artifacts, console,
metrics, errors), data, training and deploy; apps holds the entry points (the tlpipe command, init,
summary, the sweep).
"""
