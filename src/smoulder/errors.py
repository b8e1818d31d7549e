"""Exceptions that speak to the user: which file, what was expected, what was found."""

from __future__ import annotations

from pathlib import Path


class SmoulderError(Exception):
    """Base class of every error smoulder raises on purpose."""


class ExpectedFoundError(SmoulderError, ValueError):
    """Something is not what smoulder needs: says what, what was expected and what was found.

    The message is one line: ``<subject>: expected <expected>, found <found>[; <hint>]``.
    :class:`InputError` (a file) and :class:`RegistrationError` (a transform or grid) are the
    kinds raised; catch this class to handle both.

    Examples:
        >>> err = ExpectedFoundError("mask", expected="0/1 values", found="3", hint="binarise it")
        >>> str(err), err.hint
        ('mask: expected 0/1 values, found 3; binarise it', 'binarise it')
    """

    def __init__(self, subject: str, *, expected: str, found: str, hint: str | None = None) -> None:
        self.expected = expected
        self.found = found
        self.hint = hint
        message = f"{subject}: expected {expected}, found {found}"
        if hint:
            message += f"; {hint}"
        super().__init__(message)


class InputError(ExpectedFoundError):
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
        super().__init__(self.path, expected=expected, found=found, hint=hint)


class ConfigError(SmoulderError, ValueError):
    """A configuration value or file is invalid (names the key and the bad value)."""


class RegistrationError(ExpectedFoundError):
    """A transform, image grid or resampling request cannot be honoured.

    The message is one line: ``<what>: expected <expected>, found <found>[; <hint>]``.

    Examples:
        >>> str(RegistrationError("moving image", expected="a 3D image", found="4D (4, 4, 4, 2)"))
        'moving image: expected a 3D image, found 4D (4, 4, 4, 2)'
    """

    def __init__(self, what: str, *, expected: str, found: str, hint: str | None = None) -> None:
        self.what = what
        super().__init__(what, expected=expected, found=found, hint=hint)
