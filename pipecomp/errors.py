"""The one exception type of compilation."""


class CompileError(ValueError):
    """A model that pipecomp cannot compile; the message names the module and the fix."""
