"""The one exception tree of chronoq.

::

    ChronoqError                 base of everything chronoq raises on purpose
    ├── ConfigError              settings or files are wrong; the process exits with EX_CONFIG (78)
    │   └── JobSpecError         one or more job-file problems, each naming file, job and field
    ├── RedisUnavailableError    Redis refused, timed out or rejected our credentials
    │   └── RedisAuthError       wrong password or user: retrying cannot help
    ├── NotReplicatedError       a write was not confirmed by REDIS_WAIT_REPLICAS replicas (also
    │                            a redis ConnectionError: every caller retries it as one)
    ├── EmbeddedRedisError       no redis-server binary, or the embedded server would not start
    ├── DispatchError            a fire could not be published (retried by the dispatcher)
    ├── UnknownJobError          no job with that id (also a KeyError): not registered with
    │                            this manager, or not in the fleet's job registry
    └── JobChangeError           a change to a job through the API was refused, nothing stored
        ├── VersionConflictError the job changed since the version the caller read
        ├── OwnershipError       the job belongs to a job file or code, or its id is taken
        └── BackfillLimitError   a backfill asks for more fires than SCHEDULER_BACKFILL_MAX_FIRES

Messages say what is wrong and how to fix it, and never contain a secret: URLs are redacted
with :func:`shared.redis.redact_url` before they are put in a message.
"""

from __future__ import annotations

import redis

EX_CONFIG = 78  # sysexits.h: configuration error
EX_UNAVAILABLE = 69  # sysexits.h: a service we need is unavailable


class ChronoqError(Exception):
    """Base class of every error chronoq raises on purpose."""


class ConfigError(ChronoqError):
    """Settings or configuration files are invalid.

    ``problems`` holds one line per problem; ``str()`` joins them so a caller can print the
    error as it is.
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class JobSpecError(ConfigError):
    """One or more job files are invalid; every problem names the file, the job and the field."""


class RedisUnavailableError(ChronoqError):
    """Redis did not answer in time or refused the connection."""


class RedisAuthError(RedisUnavailableError):
    """Redis rejected our credentials; retrying cannot help."""


class NotReplicatedError(ChronoqError, redis.ConnectionError):
    """A write was not confirmed by ``REDIS_WAIT_REPLICAS`` replicas within
    ``REDIS_WAIT_TIMEOUT_MS`` (the master may have been replaced: what it took can be discarded).
    A ``redis.ConnectionError`` too, so every caller retries it as a dropped connection: on
    the master the Sentinels name by then, and chronoq's writes are safe to repeat."""


class EmbeddedRedisError(ChronoqError):
    """The embedded redis-server could not be found or started."""


class DispatchError(ChronoqError):
    """A fire could not be published to the broker."""


class UnknownJobError(ChronoqError, KeyError):
    """No job with that id is registered; ``job_id`` names it."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r} is registered (`chronoq jobs list` shows the jobs replicas run)")

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument; this error's is its message.
        return str(self.args[0])


class JobChangeError(ChronoqError):
    """A change to a job through the API was refused; nothing was stored."""


class VersionConflictError(JobChangeError):
    """The job's stored version is not the one the caller expected."""

    def __init__(self, job_id: str, expected: int, current: int) -> None:
        self.job_id, self.expected, self.current = job_id, expected, current
        super().__init__(
            f"job {job_id!r}: version conflict: expected version {expected}, the stored one is {current} "
            "(someone changed it meanwhile; read it again and retry)"
        )


class OwnershipError(JobChangeError):
    """The job is owned by another source (a job file, code), or its id is taken by one."""

    def __init__(self, job_id: str, message: str, owner: str = "") -> None:
        self.job_id, self.owner = job_id, owner
        super().__init__(f"job {job_id!r}: {message}")


class BackfillLimitError(JobChangeError):
    """A backfill range holds more fires than one request may dispatch."""
