"""User-facing failures: one hierarchy, one line each, a distinct exit code per kind.

The CLI prints ``str(error)`` and exits with ``error.exit_code``; nothing else
in the program decides how a failure looks to the user.
"""


class LayermountError(Exception):
    """A failure the user can act on; the message names the thing at fault."""

    exit_code = 1


class NetworkError(LayermountError):
    """A registry could not be reached, or the connection failed more often than retries allow."""


class UsageError(LayermountError):
    """Bad arguments or options."""

    exit_code = 2


class ImageError(LayermountError):
    """The image is unreadable, malformed, or not what it claims to be."""

    exit_code = 3


class DigestMismatch(ImageError):
    """A layer's bytes do not hash to the digest the image records for them."""


class UnsafeArchive(ImageError):
    """A layer tar member would escape its layer directory or is otherwise hostile."""


class StoreError(LayermountError):
    """The layer store is missing, unwritable or damaged."""

    exit_code = 4


class MountError(LayermountError):
    """Mounting, serving or unmounting failed."""

    exit_code = 5
