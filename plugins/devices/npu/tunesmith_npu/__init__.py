"""The Ascend NPU device for tunesmith, through torch_npu.

``tunesmith_npu.plugin`` (the entry-point module) registers the ``npu`` device and probes for it
without importing torch_npu unless it is installed; ``tunesmith_npu.device`` holds ``NPUDevice``,
the only module importing torch_npu, loaded only when the device is chosen.
"""
