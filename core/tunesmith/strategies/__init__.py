"""The built-in multi-process strategies (``ddp``), on :class:`~tunesmith.strategies.process_group.ProcessGroupStrategy`."""
