"""The model: CartT5 and its coarse + fine fusion, the training losses and batches, beam search constrained
by the trie, and building or loading a model from a run folder (`model_io.py`)."""
