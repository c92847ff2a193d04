"""The exception types of the public API; they live in ``graphmerge.passes.errors`` so that the passes
never import the driver package."""

from graphmerge.passes.errors import CertificateError, GraphMergeError, ModelMismatchError, TraceError

__all__ = ["CertificateError", "GraphMergeError", "ModelMismatchError", "TraceError"]
