"""``python -m tunesmith.lm_eval``: lm-eval's own command line, with the ``tunesmith`` model type registered."""

import tunesmith.lm_eval  # noqa: F401  (registers the model type)
from lm_eval.__main__ import cli_evaluate

cli_evaluate()
