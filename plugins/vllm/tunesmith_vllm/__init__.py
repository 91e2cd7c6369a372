"""vLLM engines for tunesmith (see plugin.py for what is registered)."""
