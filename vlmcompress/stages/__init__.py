"""Built-in stages; importing this package registers them."""

from . import finetune, quantize, structured_prune, token_reduce  # noqa: F401
