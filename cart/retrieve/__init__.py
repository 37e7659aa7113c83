"""Answering queries with a trained run: `Retriever` (beam search + rerank), the rerank's terms, the BM25 and
dense baselines it is compared with, and the R@k / MRR@10 scoring every choice is made by."""
