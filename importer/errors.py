"""Typed importer errors; each message is one line a user can act on."""

from __future__ import annotations


class ImporterError(Exception):
    """Base class: the import failed for a reason we understood."""


class ConfigError(ImporterError):
    """A flag or environment variable is missing or malformed."""


class SourceError(ImporterError):
    """The source could not be read: HTTP status, network, missing file."""


class TransferError(SourceError):
    """The download broke off and could not be resumed within the retry budget."""


class ChecksumMismatch(ImporterError):
    """The downloaded bytes do not match the expected digest."""


class InvalidImage(ImporterError):
    """The image is malformed, of a refused format, or unsafe (backing file, data file, tar escape)."""


class ImageTooLarge(InvalidImage):
    """The image does not fit in the usable space of the target."""

    def __init__(self, virtual_size: int, available: int, *, at_least: bool = False) -> None:
        prefix = "at least " if at_least else ""
        super().__init__(
            f"virtual image size {prefix}{virtual_size} is larger than the reported available storage "
            f"{available}; a larger volume is required"
        )
        self.virtual_size = virtual_size
        self.available = available


class ScratchSpaceRequired(ImporterError):
    """The route needs a scratch directory and none was given (CDI then retries with scratch space)."""

    # The exact text CDI's controller looks for in the termination message.
    CDI_TEXT = "scratch space required and none found"

    def __init__(self, why: str) -> None:
        super().__init__(f"{self.CDI_TEXT}: {why}; pass --scratch DIR (or mount /scratch)")


class ToolError(ImporterError):
    """An external tool (qemu-img, nbdkit, a decompressor) failed; carries its last words."""


class ProgressStopped(TransferError):
    """The source stopped sending (stall timeout) or sends too slowly (minimum rate over a window)."""
