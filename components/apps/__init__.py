"""Entry points people run: the tlpipe command, the run summary, the label-budget sweep."""
