"""User errors: bad input the engine refuses, as opposed to bugs in the engine.

Every exception that means "the user gave us something we cannot run" (a config field, a
checkpoint, a prompt, a flag, a machine that lacks a feature) derives from `UserError`. The CLI
catches `UserError` and nothing else: it prints one `error: <message>` line and exits 2, so the
message must name the file, field or value at fault. Anything else is a bug and keeps its
traceback.

The subclasses that belong to one module (CheckpointError, PromptError, RouterError, ...) are
defined next to the code that raises them and derive from `UserError` there; the ones shared by
several modules live here. Each also keeps the built-in base it had (ValueError, RuntimeError), so
callers that catch those still work.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: reported as one line naming the file, field or value, never as a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration file or value the engine cannot accept; the message names the field.

    `field`, when set, is the configuration field at fault, spelled as the validator knows it
    (a `ModelConfig` attribute, say), so that a reader of some other spelling (a Hub config.json)
    can name its own key for it.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class CaptureSizeError(ConfigError):
    """A capture-size list that cannot be used; the message names the list and the offending value."""
