"""The error (and warning) that names settings: worded by field here, by each front end in its own terms."""

from __future__ import annotations

from typing import Callable


class SettingError(ValueError):
    """A setting out of range, or in conflict with another setting, the data or a saved run.

    The message is a template that names settings by field, `{grad_accum}`; the values it quotes go in
    by keyword (`{value!r}`), so that a path or repr holding braces is never read as a template.
    `str()` names settings as fields; `worded(name)` as a front end calls them (the CLI: flags).
    """

    def __init__(self, template: str, **values):
        self.template, self.values = template, values
        super().__init__(self.worded(str))

    def worded(self, name: Callable[[str], str]) -> str:
        return self.template.format_map(_Lookup(self.values, name))

    @classmethod
    def of(cls, error: Exception) -> SettingError:
        """Another library's ValueError about a setting, its message kept as it is."""
        return cls("{reason}", reason=str(error))


class SettingWarning(UserWarning):
    """A setting that is used, but whose consequences the user should know; its message is a template
    worded like SettingError's."""

    def __init__(self, template: str, **values):
        self.template, self.values = template, values
        super().__init__(self.worded(str))

    worded = SettingError.worded


class _Lookup(dict):
    """Template keys: the given values, else a field to word."""

    def __init__(self, values: dict, name: Callable[[str], str]):
        super().__init__(values)
        self.name = name

    def __missing__(self, field: str) -> str:
        return self.name(field)
