"""The one error type a stage raises for a problem the user can fix; the CLI prints it as one line."""


class PipelineError(Exception):
    """A failure with a message that says what went wrong and what to do."""
