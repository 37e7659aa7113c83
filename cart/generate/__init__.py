"""Generation from retrieved images: `cart generate` (Cross-modal RAG's sub-queries and ImageRAG's loop,
`generate.py`), the generators (preview, OmniGen, SDXL + IP-Adapter), critics and local language models."""
