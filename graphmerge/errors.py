"""The exception types of the public API; they live in ``graphmerge.passes.errors`` so that the passes
never import the driver package."""

from graphmerge.passes.errors import GraphMergeError, ModelMismatchError, TraceError

__all__ = ["GraphMergeError", "ModelMismatchError", "TraceError"]
