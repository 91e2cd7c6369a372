"""The data pipeline: files -> examples -> tokenized samples -> (packed) rows -> batches."""
