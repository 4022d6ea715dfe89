"""One error hierarchy: every failure a user can cause or fix is a GraphoptError, whose
message says what was wrong and what to do; the CLI prints it as one line and exits 2."""
from __future__ import annotations


class GraphoptError(Exception):
    """Base of every error graphopt raises on purpose."""


class UsageError(GraphoptError):
    """Bad command-line input: a model spec, a shape, a path, an option."""


class CaptureError(GraphoptError):
    """torch.fx could not capture the model."""


class PluginError(GraphoptError):
    """A plugin failed to import, registered something invalid, or clashed with another."""


class PipelineError(GraphoptError):
    """Pipeline text that does not parse, or names an unknown pass or option."""


class PassError(GraphoptError):
    """A pass raised, or its result failed verification; the graph was rolled back."""

    def __init__(self, message: str, *, pass_name: str = "", before: tuple[str, ...] = (), node: str | None = None):
        super().__init__(message)
        self.pass_name, self.before, self.node = pass_name, before, node


class EmitError(GraphoptError):
    """An emitter could not produce or load its artifact."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s innermost cause (exporters wrap the real error), or its type name if no message."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
