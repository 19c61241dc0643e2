"""One way to change what a module's forward does: swap its class for a cached subclass with another forward.

A class swap (not `module.forward = ...`) keeps `isinstance`, `state_dict` keys, hooks and `torch.compile` working.
The subclass always derives from the module's stock class (a module patched again changes forward rather than
stacking subclasses), is made once per (stock class, forward) so every patched layer of a model shares it, and
exposes the stock forward as `self._vlmc_stock_forward` for the new forward to call.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

_SUBCLASSES: dict[tuple[type, Callable], type] = {}


def swap_forward(module: nn.Module, forward: Callable, prefix: str) -> None:
    """Make `module` run `forward` (a function of `self, ...`); its class becomes `{prefix}{StockClass}`."""
    stock = getattr(type(module), "_vlmc_stock_class", type(module))
    key = (stock, forward)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{prefix}{stock.__name__}", (stock,), {
            "forward": forward, "_vlmc_stock_forward": stock.forward, "_vlmc_stock_class": stock})
    module.__class__ = _SUBCLASSES[key]
