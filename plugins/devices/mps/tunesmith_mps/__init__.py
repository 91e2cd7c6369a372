"""tunesmith's device plugin for Apple GPUs, through torch's Metal Performance Shaders (MPS) backend.

``plugin`` is the light entry-point module (the probe and the registration); ``device`` holds
:class:`~tunesmith_mps.device.MPSDevice`, imported only when ``mps`` is chosen.
"""
