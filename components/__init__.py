"""tlpipe: the stage modules dvc.yaml names live here, one per stage; libraries live in subpackages by role."""
