"""The built-in op rules, one module per family; importing this package registers every one of them
(``graphmerge.passes.registry`` does). ``base`` holds what the families are built from."""

from graphmerge.passes.rules import attention, base, elementwise, heads, indexing, layers, norms, reductions, shape

__all__ = ["attention", "base", "elementwise", "heads", "indexing", "layers", "norms", "reductions", "shape"]
