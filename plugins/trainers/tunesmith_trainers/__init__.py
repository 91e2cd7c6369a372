"""tunesmith's built-in trainers: ``sft`` (supervised fine-tuning) and ``pt`` (continued pre-training)."""
