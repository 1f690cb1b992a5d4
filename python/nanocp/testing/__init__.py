from nanocp.testing.tiny_model import make_tiny_model, make_tokenizer

__all__ = ["make_tiny_model", "make_tokenizer"]
