"""The registry store: the one API through which quantmill records and reads its history.

Every public method runs in its own managed session (commit on success, rollback on any error)
and returns frozen entities, never ORM rows. ``finish_run`` is a single transaction, so a run's
outputs, edges, metrics and status appear together or not at all.
"""

import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Self

from sqlalchemy import Engine, exists, inspect, make_url, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, aliased, sessionmaker

from quantmill.registry import lineage, migrate
from quantmill.registry.chain import ChainWriter, tail
from quantmill.registry.convert import (
    artifact_entity,
    artifact_locations,
    as_utc,
    correction_entity,
    edge_entity,
    location_entity,
    metric_entity,
    run_entity,
    runs_query,
)
from quantmill.registry.db import (
    WRITE_OPTION,
    create_registry_engine,
    create_session_factory,
    is_sqlite_memory,
    redact_url,
    resolve_database_url,
)
from quantmill.registry.entities import (
    Artifact,
    ArtifactLocation,
    Correction,
    LineageGraph,
    MetricRecord,
    NewArtifact,
    NewLocation,
    NewMetric,
    Run,
    RunEdge,
)
from quantmill.registry.errors import (
    RegistryError,
    RegistryUnavailable,
    RunNotFound,
    SchemaOutdated,
    SchemaTooNew,
)
from quantmill.registry.hashing import json_sha256
from quantmill.registry.liveness import ProcessIdentity, gone_reason, this_process
from quantmill.registry.lookup import MIN_PREFIX, find_artifact_row
from quantmill.registry.models import (
    CORRECTION_TARGETS,
    ArtifactLocationRow,
    ArtifactRow,
    Base,
    CorrectionRow,
    MetricRow,
    RunCompletionRow,
    RunEdgeRow,
    RunHeartbeatRow,
    RunRow,
    utcnow,
)
from quantmill.registry.verify import Rehash, VerifyReport, verify
from quantmill.registry.writes import (
    ClaimCheck,
    RecordWriter,
    RunCompletion,
    current_user,
    run_values,
)

__all__ = ["MIN_PREFIX", "Registry", "metric_superseded", "upgrade_command"]



def upgrade_command(url: str) -> str:
    """The shell command that brings the database at ``url`` to the current schema.

    The password is shown as ``***``: the user types it, the message never carries it.
    """
    command = f"quantmill registry upgrade --database-url '{redact_url(url)}'"
    if make_url(url).password:
        command += " (with the real password in place of ***)"
    return command


def metric_superseded() -> Any:
    """SQL condition: a later correction replaced this ``MetricRow`` (read the newer one)."""
    later = aliased(MetricRow, name="later_metric")
    return exists(select(later.id).where(later.supersedes_id == MetricRow.id))


class Registry:
    """Artifacts, runs, their lineage edges and metrics, in one SQL database.

    Create with ``Registry.open(url)``; use as a context manager or call ``close()``.
    """

    def __init__(self, engine: Engine, url: str) -> None:
        """Wrap an engine whose schema is known to be current; prefer ``Registry.open``."""
        self._engine = engine
        self._url = url
        self._sessions: sessionmaker[Session] = create_session_factory(engine)

    # --- life cycle ----------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str | None = None, *, auto_create: bool = True) -> Self:
        """Connect to the registry at ``url`` (explicit, else ``$QUANTMILL_DATABASE_URL``, else
        the embedded SQLite default) and check its schema.

        A database without any quantmill table is migrated to the head revision when
        ``auto_create`` (so the default just works). Any other revision than the head raises
        ``SchemaOutdated`` naming the upgrade command, or ``SchemaTooNew``.
        """
        resolved = resolve_database_url(url)
        engine = create_registry_engine(resolved)
        try:
            cls._prepare_schema(engine, resolved, auto_create)
        except OperationalError as exc:
            engine.dispose()
            raise RegistryUnavailable(
                f"cannot use the registry database {redact_url(resolved)}: {exc.orig or exc}"
            ) from exc
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, resolved)

    @staticmethod
    def _prepare_schema(engine: Engine, url: str, auto_create: bool) -> None:
        with engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
            revision = migrate.connection_revision(connection)
        head = migrate.head_revision()
        if revision == head:
            return
        ours = tables & set(Base.metadata.tables)
        shown = redact_url(url)
        if revision is None and not ours:
            if not auto_create:
                raise SchemaOutdated(
                    f"the registry database {shown} has no quantmill schema; create it with: "
                    f"{upgrade_command(url)}"
                )
            if is_sqlite_memory(url):
                with engine.begin() as connection:
                    migrate.upgrade(url, "head", connection=connection)
            else:
                migrate.upgrade(url, "head")
            return
        if revision is None:
            raise SchemaOutdated(
                f"the registry database {shown} has quantmill tables ({', '.join(sorted(ours))}) "
                f"but no migration revision; it was not created by `quantmill registry upgrade`, "
                f"so move it aside and run: {upgrade_command(url)}"
            )
        if revision not in migrate.known_revisions():
            raise SchemaTooNew(
                f"the registry database {shown} is at schema revision {revision!r}, which this "
                f"quantmill does not know (head is {head!r}): a newer quantmill migrated it; "
                f"upgrade quantmill"
            )
        raise SchemaOutdated(
            f"the registry database {shown} is at schema revision {revision!r}, but this "
            f"quantmill needs {head!r}; upgrade it with: {upgrade_command(url)}"
        )

    @property
    def url(self) -> str:
        """The database URL with the password hidden."""
        return redact_url(self._url)

    def close(self) -> None:
        """Release every pooled connection (needed before e.g. dropping the database)."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One reading session and transaction: commit when the block ends, roll back if it
        raises (for the registry's own query modules)."""
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def writer(self, recorded_by: str | None = None,
               claims: ClaimCheck | None = None) -> Iterator[RecordWriter]:
        """A writing transaction and the one record writer (``quantmill.registry.writes``):
        everything written in the block is stored, chained, or none of it is.

        The writer takes the chain's lock first (see ``quantmill.registry.chain``): writes are
        serialised, which is what keeps one unforked chain with many concurrent workers.
        ``recorded_by`` names who recorded locations (default: this user); ``claims`` checks
        outputs the registry cannot vouch for.
        """
        with self._sessions.begin() as session:
            session.connection(execution_options={WRITE_OPTION: True})
            yield RecordWriter(session, ChainWriter(session), recorded_by or current_user(),
                               claims)

    # --- artifacts -----------------------------------------------------------------------------

    def upsert_artifact(
        self,
        *,
        kind: str,
        name: str,
        sha256: str,
        size_bytes: int,
        uri: str,
        format: str,
        metadata: dict[str, Any] | None = None,
        locations: Sequence[NewLocation] = (),
    ) -> Artifact:
        """Register content by its sha256, or return the artifact already registered with it.

        Content-addressed: the first registration's kind, name, uri and metadata win.
        ``locations`` are recorded either way (places already recorded are skipped).
        """
        new = NewArtifact(
            kind=kind,
            name=name,
            sha256=sha256,
            size_bytes=size_bytes,
            uri=uri,
            format=format,
            role="",
            metadata=metadata or {},
            locations=tuple(locations),
        )
        with self.writer() as write:
            return artifact_entity(write.upsert_artifact(new))

    def add_location(
        self,
        ref: int | str,
        uri: str,
        role: str = "copy",
        details: dict[str, Any] | None = None,
    ) -> ArtifactLocation:
        """Record one more place where the artifact ``ref`` (id or sha256 prefix) is stored.

        Idempotent: a place already recorded for the artifact returns its existing record
        (with the role and details it was first recorded with).
        """
        new = NewLocation(uri=uri, role=role, details=details or {})
        with self.writer() as write:
            row = write.record_location(write.artifact_row(ref).id, new)
            return location_entity(row)

    def locations(self, ref: int | str) -> list[ArtifactLocation]:
        """Every place the artifact ``ref`` is stored: its primary ``uri`` first (synthesized,
        with ``id`` None, when no record names it), then the other records in id order."""
        with self.session() as session:
            artifact = find_artifact_row(session, ref)
            rows = session.scalars(
                select(ArtifactLocationRow).where(ArtifactLocationRow.artifact_id == artifact.id)
            ).all()
            return artifact_locations(artifact.id, artifact.uri, rows)

    def get_artifact(self, ref: int | str) -> Artifact:
        """The artifact with id ``ref`` (int), or whose sha256 is or starts with ``ref`` (str,
        at least 6 hex characters)."""
        with self.session() as session:
            return artifact_entity(find_artifact_row(session, ref))

    def list_artifacts(
        self, kind: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[Artifact]:
        """Artifacts, newest first, optionally of one ``kind``."""
        query = select(ArtifactRow)
        if kind is not None:
            query = query.where(ArtifactRow.kind == kind)
        query = query.order_by(ArtifactRow.created_at.desc(), ArtifactRow.id.desc())
        with self.session() as session:
            rows = session.scalars(query.limit(limit).offset(offset))
            return [artifact_entity(row) for row in rows]

    # --- runs ----------------------------------------------------------------------------------

    def start_run(
        self,
        *,
        job_id: str,
        kind: str,
        name: str,
        recipe: dict[str, Any],
        plugins: dict[str, str],
        versions: dict[str, str],
        flow_run_id: str | None = None,
        details: dict[str, Any] | None = None,
        inputs: Sequence[tuple[int, str]] = (),
    ) -> Run:
        """Record a run as ``running``, with its ``(artifact_id, role)`` input edges."""
        with self.writer() as write:
            row = write.start_run(run_values(
                job_id=job_id, kind=kind, name=name, recipe=recipe, plugins=plugins,
                versions=versions, details=details or {}, flow_run_id=flow_run_id,
                host=socket.gethostname(), started_by=current_user(), started_at=utcnow(),
            ), inputs)
            write.first_beat(row)
            return run_entity(row, None)

    def finish_run(
        self,
        run_id: int,
        *,
        outputs: Sequence[NewArtifact | tuple[int, str]] = (),
        metrics: Sequence[NewMetric] = (),
        details: dict[str, Any] | None = None,
        inputs: Sequence[tuple[int | str, str]] = (),
    ) -> Run:
        """Mark a running run ``succeeded`` with its outputs and metrics, in ONE transaction.

        ``outputs`` are new artifacts (upserted by sha256, their ``locations`` recorded with
        them) or ``(artifact_id, role)`` pairs; ``metrics`` may name their artifact by sha256
        (e.g. an output of this very call) or id; ``inputs`` are further ``(artifact, role)``
        inputs known only at the end (an artifact the run reproduced).
        ``details`` keys are merged into the run's details. On any error nothing of this call
        is stored and the run stays ``running``: call ``fail_run`` then.
        """
        with self.writer() as write:
            run = write.open_run(run_id)
            write.record_results(run, outputs, metrics, inputs)
            completion = write.complete(run, RunCompletion("succeeded", details or {}))
            return run_entity(run, completion)

    def fail_run(self, run_id: int, error: str) -> Run:
        """Mark a running run ``failed`` with the error text."""
        with self.writer() as write:
            run = write.open_run(run_id)
            completion = write.complete(run, RunCompletion("failed", {}, error))
            return run_entity(run, completion)

    def producer(self, ref: int | str) -> int | None:
        """The id of the run that produced the artifact, or None (a registered input)."""
        with self.session() as session:
            artifact = find_artifact_row(session, ref)
            return session.scalars(select(RunEdgeRow.run_id).where(
                RunEdgeRow.artifact_id == artifact.id,
                RunEdgeRow.direction == "output")).first()

    def beat(self) -> int:
        """Say that this process's running runs are alive (a heartbeat thread calls this);
        the number of runs it beat for."""
        me = this_process()
        with self.session() as session:
            result = session.execute(
                update(RunHeartbeatRow)
                .where(RunHeartbeatRow.host == me.host, RunHeartbeatRow.pid == me.pid,
                       RunHeartbeatRow.process_start == me.process_start)
                .values(beat_at=utcnow()))
            return int(result.rowcount or 0)

    def reap(self, stale_after: timedelta = timedelta(minutes=10),
             dry_run: bool = False) -> list[tuple[Run, str]]:
        """Close every running run whose process is dead as ``abandoned``, with the reason
        and what its heartbeat said (append-only and chained, like any completion).

        Dead means: on this host, its process (pid and start time, same boot) no longer
        exists; from another host, no heartbeat for longer than ``stale_after``; a run with
        no heartbeat at all (recorded before heartbeats existed) counts from its start.
        Returns each abandoned run (as it would be, with ``dry_run``) and why."""
        now = utcnow()
        found: list[tuple[Run, str]] = []
        with self.writer() as write:
            rows = write.session.execute(
                select(RunRow, RunHeartbeatRow)
                .outerjoin(RunHeartbeatRow, RunHeartbeatRow.run_id == RunRow.id)
                .where(~exists().where(RunCompletionRow.run_id == RunRow.id))
                .order_by(RunRow.id)).all()
            for run, beat in rows:
                if beat is not None:
                    identity = ProcessIdentity(beat.host, beat.pid, beat.boot_id,
                                               beat.process_start)
                    last = as_utc(beat.beat_at)
                    heartbeat = {"host": beat.host, "pid": beat.pid, "boot_id": beat.boot_id,
                                 "process_start": beat.process_start,
                                 "beat_at": last.isoformat()}
                else:
                    identity = ProcessIdentity(run.host, -1, "", "")
                    last, heartbeat = as_utc(run.started_at), None
                reason = gone_reason(identity, last, now, stale_after)
                if reason is None:
                    continue
                details = {"abandoned": {"reason": reason, "heartbeat": heartbeat,
                                         "reaped_by": current_user(),
                                         "reaped_on": socket.gethostname()}}
                if dry_run:
                    found.append((run_entity(run, None), reason))
                    continue
                completion = write.complete(run, RunCompletion("abandoned", details,
                                                               f"abandoned: {reason}"))
                found.append((run_entity(run, completion), reason))
        return found

    def get_run(self, run_id: int) -> Run:
        """The run with this id."""
        with self.session() as session:
            found = session.execute(runs_query().where(RunRow.id == run_id)).first()
            if found is None:
                raise RunNotFound(f"no run with id {run_id}")
            return run_entity(*found)

    def list_runs(
        self,
        *,
        job_id: str | None = None,
        kind: str | None = None,
        status: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Run]:
        """Runs, newest first, optionally filtered by job, kind and status."""
        query = runs_query()
        if job_id is not None:
            query = query.where(RunRow.job_id == job_id)
        if kind is not None:
            query = query.where(RunRow.kind == kind)
        if status == "running":
            query = query.where(RunCompletionRow.id.is_(None))
        elif status is not None:
            query = query.where(RunCompletionRow.status == status)
        query = query.order_by(RunRow.started_at.desc(), RunRow.id.desc())
        with self.session() as session:
            rows = session.execute(query.limit(limit).offset(offset))
            return [run_entity(row, done) for row, done in rows]

    def run_edges(self, run_id: int) -> list[RunEdge]:
        """The run's input and output edges (inputs first)."""
        with self.session() as session:
            rows = session.scalars(select(RunEdgeRow).where(RunEdgeRow.run_id == run_id))
            edges = [edge_entity(row) for row in rows]
        return sorted(edges, key=lambda e: (e.direction, e.artifact_id, e.role))

    # --- metrics -------------------------------------------------------------------------------

    def metrics_for_artifact(self, artifact_id: int) -> list[MetricRecord]:
        """Every measurement of the artifact, oldest first."""
        query = select(MetricRow).where(MetricRow.artifact_id == artifact_id)
        with self.session() as session:
            return [metric_entity(row) for row in session.scalars(query.order_by(MetricRow.id))]

    def metrics_for_run(self, run_id: int) -> list[MetricRecord]:
        """Every measurement recorded by the run, in recording order."""
        query = select(MetricRow).where(MetricRow.run_id == run_id)
        with self.session() as session:
            return [metric_entity(row) for row in session.scalars(query.order_by(MetricRow.id))]

    def find_metrics(
        self,
        *,
        artifact_id: int,
        evaluator: str,
        protocol: dict[str, Any],
        dataset_artifact_id: int | None = None,
    ) -> list[MetricRecord]:
        """Earlier measurements of ``artifact_id`` by ``evaluator`` under an identical protocol
        and data set, so a rerun can reuse them instead of measuring again.

        Protocols are compared by the sha256 of their canonical JSON (key order is irrelevant).
        """
        query = select(MetricRow).where(
            MetricRow.artifact_id == artifact_id,
            MetricRow.evaluator == evaluator,
            MetricRow.protocol_sha256 == json_sha256(protocol),
            ~metric_superseded(),
        )
        if dataset_artifact_id is None:
            query = query.where(MetricRow.dataset_artifact_id.is_(None))
        else:
            query = query.where(MetricRow.dataset_artifact_id == dataset_artifact_id)
        with self.session() as session:
            return [metric_entity(row) for row in session.scalars(query.order_by(MetricRow.id))]

    # --- lineage -------------------------------------------------------------------------------

    def upstream(self, artifact_id: int, max_depth: int = 50) -> LineageGraph:
        """What the artifact was made from, up to ``max_depth`` runs back."""
        with self.session() as session:
            return lineage.upstream(session, artifact_id, max_depth)

    def downstream(self, artifact_id: int, max_depth: int = 50) -> LineageGraph:
        """What was made from the artifact, up to ``max_depth`` runs forward."""
        with self.session() as session:
            return lineage.downstream(session, artifact_id, max_depth)

    # --- corrections ---------------------------------------------------------------------------

    def correct(
        self,
        target_type: str,
        target_id: int,
        changes: dict[str, Any],
        reason: str,
        author: str | None = None,
    ) -> Correction:
        """Record that facts of an artifact, run or metric were wrong; the record stays as it was.

        ``changes`` maps field names to the values that should be read instead.
        """
        if target_type not in CORRECTION_TARGETS:
            raise RegistryError(
                f"cannot correct a {target_type!r}: corrections apply to "
                f"{', '.join(CORRECTION_TARGETS)}"
            )
        if not changes:
            raise RegistryError("a correction needs at least one changed field")
        if not reason.strip():
            raise RegistryError("a correction needs a reason")
        with self.writer() as write:
            self._check_target(write.session, target_type, target_id)
            row = self._add_correction(write.session, write.chain, target_type, target_id,
                                       changes, reason, author)
            return correction_entity(row)

    @staticmethod
    def _add_correction(
        session: Session,
        chain: ChainWriter,
        target_type: str,
        target_id: int,
        changes: dict[str, Any],
        reason: str,
        author: str | None,
    ) -> CorrectionRow:
        row = CorrectionRow(
            target_type=target_type,
            target_id=target_id,
            changes=dict(changes),
            reason=reason,
            author=author or current_user(),
            created_at=utcnow(),
        )
        session.add(row)
        session.flush()
        chain.append("corrections", row.id)
        return row

    def correct_metric(
        self, metric_id: int, value: float, reason: str, author: str | None = None
    ) -> MetricRecord:
        """Replace a measurement: a new metric row that supersedes the old one (searches and
        reuse read the newest), plus a correction record saying why."""
        if not reason.strip():
            raise RegistryError("a correction needs a reason")
        with self.writer() as write:
            session, chain = write.session, write.chain
            old = session.get(MetricRow, metric_id)
            if old is None:
                raise RegistryError(f"no metric with id {metric_id}")
            later = select(MetricRow.id).where(MetricRow.supersedes_id == old.id)
            if session.scalars(later).first() is not None:
                raise RegistryError(
                    f"metric {metric_id} was already corrected; correct the newest one instead"
                )
            checked = NewMetric(evaluator=old.evaluator, name=old.name, value=value,
                                artifact_id=old.artifact_id)
            new = MetricRow(
                run_id=old.run_id,
                artifact_id=old.artifact_id,
                evaluator=old.evaluator,
                dataset_artifact_id=old.dataset_artifact_id,
                name=old.name,
                value=checked.value,
                unit=old.unit,
                protocol=dict(old.protocol),
                protocol_sha256=old.protocol_sha256,
                supersedes_id=old.id,
                created_at=utcnow(),
            )
            session.add(new)
            session.flush()
            chain.append("metrics", new.id)
            self._add_correction(session, chain, "metric", old.id,
                                 {"value": checked.value, "superseded_by": new.id}, reason, author)
            return metric_entity(new)

    def corrections_for(self, target_type: str, target_id: int) -> list[Correction]:
        """Every correction of the record, oldest first."""
        query = (
            select(CorrectionRow)
            .where(CorrectionRow.target_type == target_type, CorrectionRow.target_id == target_id)
            .order_by(CorrectionRow.id)
        )
        with self.session() as session:
            return [correction_entity(row) for row in session.scalars(query)]

    def _check_target(self, session: Session, target_type: str, target_id: int) -> None:
        model = {"artifact": ArtifactRow, "run": RunRow, "metric": MetricRow}[target_type]
        if session.get(model, target_id) is None:
            raise RegistryError(f"no {target_type} with id {target_id}")

    # --- tamper evidence -----------------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        """``(number of links, head hash)`` of the ledger: write it down to anchor a later
        ``verify``."""
        with self.session() as session:
            return tail(session)

    def verify(
        self, rehash: Rehash | None = None, expected_head: str | None = None
    ) -> VerifyReport:
        """Recompute the chain, compare every record with its chained copy and, given
        ``rehash``, the content at every location of every artifact with its registered hash."""
        with self._sessions.begin() as session:
            if session.get_bind().dialect.name == "postgresql":
                # one snapshot for the whole check: a run committed mid-walk must not look like
                # a row written around the ledger
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            return verify(session, rehash, expected_head)
