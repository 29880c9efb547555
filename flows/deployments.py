"""Prefect deployments of quantmill jobs: a recipe or a batch pinned, scheduled, on a work pool.

``deploy`` validates the file as a worker will (plugins configured, inputs checked against the
service's input roots) and creates or updates a deployment of the ``compress`` flow (a recipe)
or the ``tradeoff`` flow (a batch) whose parameters hold the file's *text*: what a schedule runs
is what was deployed, whatever happens to the file later. The deployment's version is the text's
sha256 (first 12 hex digits), so a changed file makes a new version, and every flow run records
the version it ran (Prefect's ``deployment_version``). The deployer's software environment
(``flows/environment.py``) is pinned beside it, for the worker's skew check.

``submit`` queues one run now through the pool's ad-hoc deployment (``<flow>/quantmill-<pool>``,
no schedule, no pinned parameters): the run itself carries the validated text. Neither puts a
credential in a parameter (parameters are visible in the Prefect UI): the registry URL and the
storage credentials come from the worker's environment.

The entrypoint is the installed module path (``quantmill.flows.compress.compress``), so a worker
needs quantmill installed (``make setup``), nothing pulled. Deployments are written with
``to_deployment(...).apply()``: ``flow.deploy()`` lists the pool's workers with a request that
prefect 3.8.8's server refuses.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from prefect._internal.versioning import VersionType
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.sorting import DeploymentSort
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron, Interval, RRule, Schedule
from prefect.types.entrypoint import EntrypointType

from quantmill.flows.batch import plan_batch
from quantmill.flows.environment import current_environment
from quantmill.flows.input_roots import InputRoots
from quantmill.flows.prefect_server import SERVICE_TAG, ServiceError, check_server
from quantmill.flows.recipe import load_yaml_text, parse_recipe, resolve_job
from quantmill.plugins.catalog import Catalog
from quantmill.plugins.errors import ConfigError
from quantmill.plugins.manager import get_plugin_manager

FLOWS = ("compress", "tradeoff", "probe")
_TAG_VALUE = re.compile(r"[^A-Za-z0-9._+-]+")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


@dataclass(frozen=True)
class JobFile:
    """A validated recipe or batch, ready to be pinned in a deployment or a flow run."""

    kind: Literal["recipe", "batch"]
    name: str
    text: str
    path: Path
    tags: tuple[str, ...]
    points: tuple[str, ...] = field(default_factory=tuple)  # a batch's point labels

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def version(self) -> str:
        return self.sha256[:12]

    @property
    def flow_name(self) -> str:
        return "compress" if self.kind == "recipe" else "tradeoff"

    def parameters(self, pool: str) -> dict[str, Any]:
        """The flow's parameters: the text, where it came from, the deployer's environment; a
        batch's points go to the same pool as child flow runs."""
        environment = current_environment().record()
        if self.kind == "recipe":
            return {"recipe_text": self.text, "recipe_path": str(self.path),
                    "recipe_name": self.name, "environment": environment}
        return {"batch_text": self.text, "batch_path": str(self.path), "batch_name": self.name,
                "environment": environment, "pool": pool}


def _tag(key: str, value: str) -> str:
    return f"{key}:{_TAG_VALUE.sub('-', value).strip('-')[:60]}"


def job_tags(model: Path | str, methods: list[str], team: str | None,
             extra: list[str]) -> tuple[str, ...]:
    """``quantmill``, ``model:<file>``, ``method:<m>``, ``team:<t>`` and the user's own tags:
    usable in the UI's filters and in Prefect's tag concurrency limits (``tag:method:gptq``)."""
    name = Path(str(model)).name
    tags = [SERVICE_TAG, _tag("model", name)]
    tags += [_tag("method", m) for m in dict.fromkeys(methods)]
    if team:
        tags.append(_tag("team", team))
    for tag in extra:
        if not tag.strip() or len(tag) > 100:
            raise ConfigError(f"tag {tag!r} must be 1 to 100 characters")
        tags.append(tag.strip())
    return tuple(dict.fromkeys(tags))


def load_job_file(path: Path, *, team: str | None = None, tags: list[str] | None = None,
                  roots: InputRoots | None = None, catalog: Catalog | None = None) -> JobFile:
    """Validate a recipe or batch as a worker bounded by ``roots`` will resolve it (default: the
    service's roots), before anything is deployed or queued."""
    catalog = catalog or Catalog(get_plugin_manager())
    roots = roots or InputRoots.for_service()
    if not path.is_file():
        raise ConfigError(f"recipe or batch file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not a YAML text file (not UTF-8: byte {exc.start})") \
            from None
    data = load_yaml_text(text, str(path))
    path = path.resolve()
    if isinstance(data, dict) and "base" in data:
        plan = plan_batch(text, path, catalog, roots=roots)
        methods = [p.method for p in plan.points]
        return JobFile("batch", plan.name, text, path,
                       job_tags(plan.model_path, methods, team, tags or []) + (
                           _tag("batch", plan.name),),
                       tuple(p.label for p in plan.points))
    recipe = parse_recipe(data, path.parent)
    job = resolve_job(recipe, text, path, catalog, roots)
    return JobFile("recipe", recipe.name, text, path,
                   job_tags(job.model_path, [recipe.quantization.method], team, tags or []))


def _validation_message(exc: Exception) -> str:
    """The first "Value error, ..." of a pydantic error, without its decorations."""
    for line in str(exc).splitlines():
        if "Value error, " in line:
            return line.split("Value error, ", 1)[1].split(" [type=", 1)[0]
    return str(exc).splitlines()[0]


def make_schedule(cron: str | None, interval: float | None, rrule: str | None,
                  timezone: str | None) -> Schedule | None:
    """One schedule from the CLI's options; a bad expression is one line naming it (checked by
    Prefect's own schedule models, as the server will check it)."""
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule, RRuleSchedule

    given = [name for name, value in (("--cron", cron), ("--interval", interval),
                                      ("--rrule", rrule)) if value is not None]
    if len(given) > 1:
        raise ConfigError(f"give one schedule, not {' and '.join(given)}")
    if not given:
        if timezone is not None:
            raise ConfigError("--timezone needs a schedule (--cron, --interval or --rrule)")
        return None
    if interval is not None and interval <= 0:
        raise ConfigError("--interval must be a positive number of seconds")
    try:
        if cron is not None:
            CronSchedule(cron=cron, timezone=timezone)
            return Cron(cron, timezone=timezone)
        if interval is not None:
            IntervalSchedule(interval=timedelta(seconds=interval), timezone=timezone)
            return Interval(timedelta(seconds=interval), timezone=timezone)
        RRuleSchedule(rrule=rrule, timezone=timezone)
        return RRule(rrule, timezone=timezone)
    except ValueError as exc:  # pydantic's ValidationError is one
        raise ConfigError(f"invalid {given[0]}: {_validation_message(exc)}") from None


def _flow(name: str) -> Any:
    if name == "compress":
        from quantmill.flows.compress import compress

        return compress
    if name == "probe":
        from quantmill.flows.probe import probe

        return probe
    from quantmill.flows.tradeoff import tradeoff

    return tradeoff


def require_pool(client: Any, pool: str) -> Any:
    try:
        return client.read_work_pool(pool)
    except ObjectNotFound:
        raise ServiceError(f"work pool {pool!r} does not exist on the Prefect server (create "
                           f"it with: prefect work-pool create {pool} --type process, or start "
                           f"a worker: quantmill worker --pool {pool})") from None


def _existing(client: Any, full_name: str) -> Any | None:
    try:
        return client.read_deployment_by_name(full_name)
    except ObjectNotFound:
        return None


@dataclass(frozen=True)
class Deployed:
    id: str
    full_name: str
    version: str
    previous_version: str | None
    created: bool


def deploy(job: JobFile, pool: str, *, name: str | None = None,
           schedule: Schedule | None = None) -> Deployed:
    """Create or update ``<flow>/<name>`` on ``pool`` with the job's text pinned."""
    check_server()
    name = name or job.name
    if not _NAME.match(name):
        raise ConfigError(f"deployment name {name!r}: use letters, digits and . _ + - "
                          "(at most 100)")
    full_name = f"{job.flow_name}/{name}"
    with get_client(sync_client=True) as client:
        require_pool(client, pool)
        before = _existing(client, full_name)
    deployment = _flow(job.flow_name).to_deployment(
        name=name, entrypoint_type=EntrypointType.MODULE_PATH,
        version=job.version, version_type=VersionType.SIMPLE,
        tags=list(job.tags), parameters=job.parameters(pool),
        description=(f"quantmill {job.kind} {job.name} ({job.path.name}, sha256 {job.sha256})"),
        schedules=[schedule] if schedule is not None else None,
        paused=bool(before.paused) if before is not None else False,
    )
    deployment_id = deployment.apply(work_pool_name=pool)
    return Deployed(str(deployment_id), full_name, job.version,
                    before.version if before is not None else None, before is None)


def adhoc_deployment(client: Any, flow_name: str, pool: str) -> str:
    """The pool's unscheduled deployment that ``submit`` (and a batch's points) run through."""
    full_name = f"{flow_name}/quantmill-{pool}"
    if _existing(client, full_name) is None:
        deployment = _flow(flow_name).to_deployment(
            name=f"quantmill-{pool}", entrypoint_type=EntrypointType.MODULE_PATH,
            version="adhoc", version_type=VersionType.SIMPLE, tags=[SERVICE_TAG],
            description=f"quantmill: runs submitted to pool {pool} (each run carries its "
                        "validated recipe or batch)")
        deployment.apply(work_pool_name=pool)
    return full_name


def flow_of(deployment: Any) -> str:
    """The flow a deployment runs (its entrypoint is ``quantmill.flows.<module>.<flow>``)."""
    return (deployment.entrypoint or "?").rsplit(".", 1)[-1]


def list_deployments(client: Any) -> list[Any]:
    return client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))),
                                   limit=200, sort=DeploymentSort.NAME_ASC)


def read_deployment(client: Any, name: str) -> Any:
    """A deployment by ``flow/name`` or by its bare name (unique among quantmill's flows)."""
    if "/" in name:
        found = _existing(client, name)
        if found is None:
            raise ServiceError(f"no deployment {name!r}")
        return found
    matches = [d for d in list_deployments(client) if d.name == name]
    if not matches:
        raise ServiceError(f"no deployment named {name!r} (see: quantmill deployments list)")
    if len(matches) > 1:
        raise ServiceError(f"{len(matches)} deployments are named {name!r}; say which: "
                           + ", ".join(f"{flow_of(d)}/{name}" for d in matches))
    return matches[0]
