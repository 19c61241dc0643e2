"""Built-in stages; importing this package registers them."""

from . import distill, finetune, quantize, structured_prune, token_reduce  # noqa: F401
