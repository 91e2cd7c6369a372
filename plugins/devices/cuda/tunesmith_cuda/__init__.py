"""NVIDIA GPUs for tunesmith: the ``cuda`` device plugin (distribution ``tunesmith-cuda``)."""
