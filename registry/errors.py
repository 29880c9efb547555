"""Domain errors of the registry.

Why a hierarchy of our own: callers (the CLI, the flows) catch ``RegistryError`` and print its
message as one line, without knowing about SQLAlchemy. Every message names what was asked for and,
where the user can fix it, how.
"""


class RegistryError(Exception):
    """Any problem the registry can describe to a user in one sentence."""


class RegistryUnavailable(RegistryError):
    """The database cannot be reached or opened (server down, wrong path, missing database)."""


class SchemaMismatch(RegistryError):
    """The database schema is not the one this version of quantmill was written for."""


class SchemaOutdated(SchemaMismatch):
    """The database is empty or at an older migration; ``quantmill registry upgrade`` fixes it."""


class SchemaTooNew(SchemaMismatch):
    """The database is at a migration this quantmill does not know: a newer release wrote it."""


class ArtifactNotFound(RegistryError, LookupError):
    """No artifact matches the given id, sha256 or sha256 prefix."""


class AmbiguousReference(RegistryError, LookupError):
    """A sha256 prefix matches more than one artifact; a longer prefix is needed."""


class RunNotFound(RegistryError, LookupError):
    """No run has the given id."""


class RunStateError(RegistryError):
    """The run is not in a state that allows the operation (e.g. finishing a finished run)."""


class ArtifactConflict(RegistryError):
    """Content with this sha256 is already registered with a different size: a caller bug."""


class InvalidClaim(RegistryError, ValueError):
    """A record claims what the registry's rules forbid (a metric about an artifact the run
    neither consumed nor produced, outputs of a run that did not succeed, content storage does
    not hold); the message names the record."""


class InvalidQuery(RegistryError, ValueError):
    """A search, filter or page request that cannot be answered as asked (bad operator, value,
    date or page size); the message names the offending part."""
