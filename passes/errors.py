"""One exception type for every mistake a user can make.

The CLI prints its message as one paragraph and exits with code 2; the API raises it. Messages
name the cause (file, line, op, group, parameter) and the fix.
"""


class GraphMergeError(Exception):
    """A bad input or an unsupported model, explained for the person who supplied it."""


class TraceError(GraphMergeError):
    """The model could not be captured by torch.export or run on its example inputs."""


class ModelMismatchError(GraphMergeError):
    """Teachers, checkpoints or a student do not share one architecture."""


class CertificateError(GraphMergeError):
    """A pass checked its own result on the example inputs and found it wrong (a compiler gap)."""
