"""The ``tunesmith`` sub-commands, one module each."""
