"""Loading causal LMs and fingerprinting them."""

from attribindex.model._loading import DTYPES, load_model, model_fingerprint, resolve_device

__all__ = ["DTYPES", "load_model", "model_fingerprint", "resolve_device"]
