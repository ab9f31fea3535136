"""Errors that mean "the request is wrong", as opposed to failures of the user's own code.

The magics turn these into IPython UsageErrors; the Python API raises them as they are.
"""


class AmpUsageError(ValueError):
    """Bad input to amp_magics: the message names the problem and the fix."""
