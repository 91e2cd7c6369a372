"""``tunesmith serve``: an OpenAI-compatible HTTP server over one model and its LoRA adapters.

One module per concept: :mod:`~tunesmith.serving.errors` (the error body every failure
answers with), :mod:`~tunesmith.serving.requests` (a request body checked field by field),
:mod:`~tunesmith.serving.choice_text` (a choice's text as its tokens arrive, cut at stop
strings), :mod:`~tunesmith.serving.batcher` (the one thread that owns the model and batches
queued requests), :mod:`~tunesmith.serving.server` (the routes).
"""
