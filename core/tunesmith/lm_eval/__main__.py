"""``python -m tunesmith.lm_eval``: lm-eval's own command line, with the ``tunesmith`` model type registered."""

from lm_eval.__main__ import cli_evaluate

import tunesmith.lm_eval  # noqa: F401  (registers the model type)

cli_evaluate()
