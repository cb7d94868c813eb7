"""Training a model: the loop, its schedule, data and tokenizer, checkpoints, several processes, plots."""
