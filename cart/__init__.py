"""cart: generative cross-modal retrieval in the style of CART (Fang et al., ACL 2025)."""

__version__ = "0.1.0"
