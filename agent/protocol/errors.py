"""The exception hierarchy every part of litefleet raises.

Messages are written for the person who has to act on them: they name the file, key, field
or chunk that is wrong and, where there is one, what to do about it.
"""

from __future__ import annotations


class LitefleetError(Exception):
    """Base of every error litefleet raises on purpose."""


class SchemaError(LitefleetError, ValueError):
    """A document (profile, manifest, config, message) does not match its schema.

    ``source`` names the document (a file path or a topic), ``field`` the dotted path of the
    offending field, so the message reads ``profiles/x.toml: quantization.mode: ...``.
    """

    def __init__(self, source: str, field: str, problem: str) -> None:
        self.source = source
        self.field = field
        self.problem = problem
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {problem}")


class ProfileError(LitefleetError):
    """A device profile is unknown or invalid."""


class KeyFileError(LitefleetError):
    """A key file is missing, unreadable, of the wrong kind, or its passphrase is wrong."""


class BundleError(LitefleetError):
    """A bundle cannot be trusted or used. Retrying the same file never helps."""


class TruncatedBundleError(BundleError):
    """The bundle file ends early or is not a bundle at all."""


class SignatureError(BundleError):
    """The manifest's signature is missing, made by an untrusted key, or does not verify."""


class TamperedError(BundleError):
    """The model does not match the hashes in the signed manifest."""
