"""Errors that are the user's to fix: the command line prints them without a traceback."""

from __future__ import annotations

__all__ = ["ComponentOutputError", "MtrunError", "PluginError", "RegistrationError", "RecipeError", "ResumeError", "TrainingError"]


class MtrunError(Exception):
    """Base class for errors reported to the user as a message and an exit status."""

    exit_code = 1


class PluginError(MtrunError):
    """A plugin could not be imported or loaded."""


class RegistrationError(PluginError):
    """A plugin registered a component that breaks the registry's rules."""


class RecipeError(MtrunError):
    """A recipe is invalid. Holds every problem found, so they are reported at once."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        lines = [f"{source}: recipe is invalid"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class TrainingError(MtrunError):
    """Training stopped for a reason the user must look at (non-finite loss, bad resume)."""


class ResumeError(TrainingError):
    """A resume that cannot be honoured (no such checkpoint, an unreadable one, a changed batch
    size); raised before any step, so the run folder is as it was."""


class ComponentOutputError(TrainingError):
    """A component returned something its interface does not allow (a wrong shape or type);
    the message names its recipe table and type."""
