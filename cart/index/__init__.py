"""Identifiers and the index over them: the `cart ids` stage (`build_ids.py`) turns embeddings into
K-Means + RQ-VAE + counter codes (`identifiers.py`, `rqvae.py`), their token layout and the prefix trie."""
