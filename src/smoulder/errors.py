"""Exceptions that speak to the user: which file, what was expected, what was found."""

from __future__ import annotations

from pathlib import Path


class SmoulderError(Exception):
    """Base class of every error smoulder raises on purpose."""


class InputError(SmoulderError, ValueError):
    """An input file is not what smoulder needs.

    The message is one line: ``<file>: expected <expected>, found <found>[; <hint>]``.

    Examples:
        >>> err = InputError("sub-01_T1w.nii.gz", expected="a 3D image", found="4D (4, 4, 4, 2)")
        >>> str(err)
        'sub-01_T1w.nii.gz: expected a 3D image, found 4D (4, 4, 4, 2)'
    """

    def __init__(
        self, path: str | Path, *, expected: str, found: str, hint: str | None = None
    ) -> None:
        self.path = str(path)
        self.expected = expected
        self.found = found
        self.hint = hint
        message = f"{self.path}: expected {expected}, found {found}"
        if hint:
            message += f"; {hint}"
        super().__init__(message)


class ConfigError(SmoulderError, ValueError):
    """A configuration value or file is invalid (names the key and the bad value)."""


class RegistrationError(SmoulderError, ValueError):
    """A transform, image grid or resampling request cannot be honoured.

    The message is one line: ``<what>: expected <expected>, found <found>[; <hint>]``.

    Examples:
        >>> str(RegistrationError("moving image", expected="a 3D image", found="4D (4, 4, 4, 2)"))
        'moving image: expected a 3D image, found 4D (4, 4, 4, 2)'
    """

    def __init__(self, what: str, *, expected: str, found: str, hint: str | None = None) -> None:
        self.what = what
        self.expected = expected
        self.found = found
        self.hint = hint
        message = f"{what}: expected {expected}, found {found}"
        if hint:
            message += f"; {hint}"
        super().__init__(message)
