"""A fake accelerator for tunesmith's tests: CPU underneath, reporting simulated memory and
recording every call tunesmith makes to it. Installed by ``tests/test_fake_device_install.py``."""
