"""tlpipe components: one module per pipeline stage, each with one public `run(params)`."""
