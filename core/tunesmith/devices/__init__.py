"""Devices built into tunesmith (cpu); accelerators come from separately installed plugins."""
