"""Pydantic response models of the admin API, so the OpenAPI schema documents every answer.

Models mirror the JSON-ready dicts of the core (``coordinator.stats()``,
``ExecutionRecord.to_dict()``, ``KillResult``, ``DrainReport``) and of the
reputation and quarantine policies. Models fed by a dict the core or a policy
may grow accept extra keys (``extra="allow"``) and pass them through, so a new
field never breaks the API; the declared fields are the documented contract.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from tokengate.errors import ConfigurationError

from .errors import ErrorCode

__all__ = [
    "AffinityResponse",
    "ClusterInfo",
    "ClusterResponse",
    "ClusterWorker",
    "CoreAffinity",
    "CoreInfo",
    "DrainReport",
    "DrainRequest",
    "ErrorBody",
    "ExecutionRecord",
    "FleetAffinity",
    "FleetApplied",
    "FleetControl",
    "FleetHealth",
    "FleetInfo",
    "FleetMember",
    "FleetMemberStats",
    "FleetNotApplied",
    "FleetStats",
    "FleetTotals",
    "Health",
    "KillResult",
    "LaneInfo",
    "LatencySummary",
    "OperationKillResult",
    "OperationReputation",
    "OperationRunTime",
    "OperationState",
    "PoolState",
    "ProcessInfo",
    "QuarantineRecord",
    "QuarantineReleaseResult",
    "Ready",
    "StatsResponse",
    "TokenRecord",
    "WorkerInfo",
    "WorkerQueue",
    "error_responses",
    "tokengate_responses",
]

_ERROR_DESCRIPTIONS = {
    401: "Missing or invalid admin token (`WWW-Authenticate: Bearer`).",
    404: "Unknown id, a path value no route can address (e.g. one with a line break), "
         "or the policy this route needs is not installed.",
    409: "The request conflicts with the current state (see `error`).",
    422: "Malformed input.",
    500: "An installed policy lacks a method the admin API needs.",
    503: "No admin token configured (`admin_token_not_configured`), or the coordinator is not running.",
}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


#: Fields that only fleet mode fills: left out of an answer while they are null, so a server without
#: a fleet answers exactly as before. ``cluster`` (of /ready) likewise: only a Dask lane fills it.
_FLEET_FIELDS = ("member", "fleet", "members", "age", "cluster")


class _FleetAware(BaseModel):
    # No return annotation on purpose: pydantic would document the annotation instead of the model in OpenAPI.
    @model_serializer(mode="wrap")
    def _drop_null_fleet_fields(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        data = handler(self)
        if isinstance(data, dict):
            for key in _FLEET_FIELDS:
                if key in data and data[key] is None:
                    del data[key]
        return data


class _OpenFleetAware(_FleetAware, _Open):
    pass


class ErrorBody(_Open):
    """Every error answer: a stable code, a human message, and context fields depending on the code."""

    error: ErrorCode
    detail: str
    operation_type: str | None = None
    quarantine_id: str | None = None
    token_id: str | None = None
    state: str | None = None
    retry_after: float | None = None


class LatencySummary(_Open):
    """Seconds, over the most recent ``reservoir_size`` calls (``count`` is all-time)."""

    count: int
    window: int
    mean: float | None = None
    max: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None


class ProcessInfo(_Open):
    """The worker process a process-lane worker owns (its handle's figures, over all its replacements)."""

    name: str
    pid: int | None = Field(default=None, description="null before the first start and between a death and "
                                                      "its replacement")
    state: str = Field(description="new, starting, idle, busy, crashed, terminated or closed")
    rss_bytes: int | None = Field(default=None, description="resident memory of the current process")
    calls: int = Field(description="calls run by this worker's processes, all of them")
    calls_since_start: int = Field(description="calls run by the current process")
    restarts: int = Field(description="replacements, of any cause")
    crashes: int = Field(description="processes that died on their own (segfault, os._exit, OOM kill)")
    terminations: int = Field(description="processes ended on purpose (kill or timeout of a running call, stop)")
    recycles: int = Field(description="processes replaced between calls (max_calls_per_process, max_process_rss)")
    startup_seconds: float | None = Field(default=None, description="how long the current process took to start")
    recycle_due: str | None = Field(default=None, description="why the current process will be replaced "
                                                              "before its next call")


class FleetMember(_Open):
    """One live member of the fleet: which process it is and how fresh its figures are (seconds)."""

    member: str = Field(description="the member id (6 hex digits), the prefix of its fleet token ids")
    pid: int
    host: str
    version: str
    process_started_at: float
    joined_at: float
    heartbeat_age: float = Field(description="seconds since its fleet thread last wrote a heartbeat")
    snapshot_age: float | None = Field(default=None, description="seconds since the figures shown for it were "
                                                                 "taken (0 for the member that answered)")
    loop_stuck: bool = Field(description="its process beats but its event loop has not published for four "
                                         "heartbeats (something blocks that loop)")
    self: bool = Field(description="this member produced the answer")


class FleetMemberStats(FleetMember):
    """A member's row in ``GET /stats``: its state and main figures."""

    phase: str | None = None
    paused: bool | None = None
    draining: bool | None = None
    paused_operations: list[str] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict)
    throughput_per_s: float | None = None
    pending_total: int | None = None
    held_total: int | None = None
    queue_wait_p99: float | None = None
    run_time_p99: float | None = None
    uptime: float | None = None


class FleetTotals(_Open):
    """Fleet-wide figures: counters of live members plus those that left or died (``retired``); gauges of live ones."""

    members: int
    paused_members: int
    draining_members: int
    stuck_members: int
    counts: dict[str, int]
    throughput_per_s: float
    pending_total: int
    held_total: int


class FleetStats(_Open):
    """The fleet part of ``GET /stats``: totals and one row per live member."""

    member: str | None = Field(description="the member that answered (null: not joined yet)")
    fleet: str
    error: str | None = Field(default=None, description="why the fleet file could not be used (figures are then "
                                                        "this process's only)")
    totals: FleetTotals
    members: list[FleetMemberStats]
    retired: dict[str, float] = Field(default_factory=dict, description="summed counters of departed members")
    desired: dict[str, Any] = Field(default_factory=dict, description="the fleet's standing control state, applied "
                                                                      "by a member when it joins")


class FleetAffinity(_Open):
    """The fleet part of ``GET /affinity``: routed counts per weight class, summed and per member."""

    member: str | None = None
    routed_by_weight: dict[str, int]
    members: list[dict[str, Any]]


class FleetHealth(_Open):
    """The fleet part of ``GET /health``: every live member, and the ones that left or died recently."""

    member: str | None = None
    fleet: str
    error: str | None = None
    members: list[FleetMember]
    departed: list[dict[str, Any]] = Field(default_factory=list)


class FleetApplied(_Open):
    """A member that applied a control action, with its own result."""

    member: str
    pid: int | None = None
    result: Any = None


class FleetNotApplied(_Open):
    """A member that did not apply a control action, and why."""

    member: str
    pid: int | None = None
    reason: str


class FleetControl(_Open):
    """Which members applied a control action (fleet mode). Standing changes also reach members that start later."""

    command: int | None = Field(default=None, description="its sequence number in the fleet file (null: not "
                                                          "written, see error)")
    action: str
    operation: str | None = None
    member: str | None = Field(default=None, description="the member that answered and sent it")
    applied: list[FleetApplied]
    not_applied: list[FleetNotApplied]
    error: str | None = None


class FleetInfo(_Open):
    """``GET /fleet``: the fleet's settings, members, departed members, standing state and retired counters."""

    enabled: bool
    directory: str | None = None
    fleet: str | None = None
    member: str | None = None
    joined: bool = False
    error: str | None = None
    heartbeat_interval: float | None = None
    stale_after: float | None = Field(default=None, description="seconds without a heartbeat after which a "
                                                                "member is marked gone")
    poll_interval: float | None = None
    snapshot_build_seconds: float | None = Field(default=None, description="what the last snapshot cost this "
                                                                           "member's event loop")
    desired: dict[str, Any] = Field(default_factory=dict)
    members: list[FleetMember] = Field(default_factory=list)
    departed: list[dict[str, Any]] = Field(default_factory=list)
    retired: dict[str, float] = Field(default_factory=dict)


class WorkerInfo(_OpenFleetAware):
    """One worker: its mailbox depth and what it is running now; on the process lane, its worker process."""

    core_id: int | None = None
    worker_id: str
    lane: str = Field(default="thread", description="thread, or process: calls run in `process`")
    index: int
    active: bool
    queue_depth: int
    busy: bool
    running_operation: str | None = None
    executed: int
    busy_time: float
    classes: list[str]
    alive: bool
    process: ProcessInfo | None = Field(default=None, description="process lane only: its worker process")
    member: str | None = Field(default=None, description="fleet mode: the member this worker belongs to")
    age: float | None = Field(default=None, description="fleet mode: seconds since these figures were taken")


class CoreInfo(_Open):
    """One worker domain ("core"): owners, routed counts per weight class, live queues."""

    core_id: int
    owners: list[str]
    active_workers: int
    queue_depth: int
    pinned_pending: int
    busy_workers: int
    routed: dict[str, int]
    routed_total: int
    workers: list[WorkerInfo]


class ClusterWorker(_Open):
    """One worker of the Dask lane's cluster, as its scheduler lists it."""

    address: str = Field(description="the Dask worker's address, e.g. tcp://10.0.0.7:40123")
    name: str
    nthreads: int | None = None
    resources: dict[str, float] = Field(description="Dask resources it declares (heavy, medium, light: which "
                                                    "weight classes it serves; none: every class)")
    memory_limit: int | None = Field(default=None, description="bytes; null: no limit")


class ClusterInfo(_Open):
    """The Dask lane's cluster and its connection (``stats()["lanes"]["dask"]["cluster"]``)."""

    state: Literal["new", "connecting", "connected", "unavailable", "closed"] = Field(
        description="the connection: new (not used yet), connecting, connected, unavailable (lost or "
                    "unreachable: new Dask-lane calls are refused at submit until it reconnects), closed")
    required: bool = Field(description="a required lane holds /ready back while it is not connected")
    embedded: bool = Field(description="an embedded LocalCluster started by the coordinator")
    scheduler_address: str | None = None
    dashboard_link: str | None = Field(default=None, description="the Dask dashboard, if the scheduler serves one")
    error: str | None = Field(default=None, description="why it is not connected")
    workers: list[ClusterWorker]
    inflight: int = Field(description="calls on the cluster now")
    inflight_by_class: dict[str, int] = Field(description="calls on the cluster now, by weight class")
    submitted: int
    completed: int
    failed: int
    crashed: int = Field(description="calls whose Dask worker died (KilledWorker, after Dask's retries)")
    cancelled: int
    refused_unavailable: int = Field(description="accepted calls settled ClusterUnavailable without a connection")
    refused_at_submit: int = Field(description="calls refused at submit (ClusterDown) while the scheduler was lost")
    lost: int = Field(description="calls on the cluster when the connection was lost")
    connects: int
    reconnects: int


class ClusterResponse(BaseModel):
    """``GET /cluster``: this process's Dask-lane cluster (each server process has its own client)."""

    pid: int
    enabled: bool = Field(description="this coordinator has a Dask lane (false: cluster is null)")
    cluster: ClusterInfo | None = None
    member: str | None = Field(default=None, description="fleet mode: the member that answered")


class LaneInfo(_Open):
    """A lane other than threads (``stats()["lanes"][name]``): its own domains, queues and workers."""

    lane: str
    ready: bool = Field(description="every worker of the lane is up (warm worker processes started)")
    cores: list[CoreInfo]
    pending: dict[str, int]
    pending_total: int
    peak_pending: int
    held: dict[str, int]
    paused: bool
    paused_operations: list[str]
    mailbox_size: int
    max_pending: int
    routing: dict[str, Any]
    cluster: ClusterInfo | None = Field(default=None, description="the Dask lane only: its cluster")


class StatsResponse(_OpenFleetAware):
    """``coordinator.stats()`` plus ``pid`` (each server process has its own coordinator)."""

    pid: int
    name: str
    phase: str
    mode: str
    uptime: float
    started_at: float | None = None
    paused: bool
    draining: bool
    paused_operations: list[str]
    topology: dict[str, Any]
    routing: dict[str, Any]
    counts: dict[str, int]
    throughput_per_s: float
    queue_wait: LatencySummary
    run_time: LatencySummary
    pending: dict[str, int]
    pending_total: int
    peak_pending: int
    held: dict[str, int]
    mailbox_size: int
    max_pending: int
    routed_by_weight: dict[str, int]
    cores: list[CoreInfo]
    lanes: dict[str, LaneInfo] = Field(default_factory=dict, description="lanes other than threads, by name "
                                                                         "(the thread lane's figures are above)")
    policies: dict[str, dict[str, Any]]
    member: str | None = Field(default=None, description="fleet mode: the member that answered (the figures "
                                                         "above are its own)")
    fleet: FleetStats | None = Field(default=None, description="fleet mode: totals and every member "
                                                               "(null without a fleet or with ?scope=member)")


class WorkerQueue(BaseModel):
    """Live queue depth of one worker."""

    worker_id: str
    queue_depth: int
    busy: bool
    active: bool


class CoreAffinity(BaseModel):
    """Where calls went: routed counts per weight class, and the domain's live queues."""

    core_id: int
    owners: list[str]
    routed: dict[str, int]
    routed_total: int
    queue_depth: int
    busy_workers: int
    active_workers: int
    workers: list[WorkerQueue]


class AffinityResponse(_FleetAware):
    """Per-core, per-weight routed counts and live queue depth per worker."""

    pid: int
    mailbox_size: int
    routed_by_weight: dict[str, int]
    cores: list[CoreAffinity]
    member: str | None = None
    fleet: FleetAffinity | None = None


class ExecutionRecord(_OpenFleetAware):
    """One settled call from the bounded execution history (newest first). Times in seconds."""

    token_id: str
    operation_type: str
    state: str
    success: bool
    weight: str
    queue_wait: float | None = None
    run_time: float | None = None
    core_id: int | None = None
    worker_id: str | None = None
    attempt: int
    finished_at: float
    error: str | None = None
    complexity: str = ""
    lane: str | None = Field(default=None, description="thread or process: the lane of the worker that ran it")
    member: str | None = Field(default=None, description="fleet mode: the member that ran it (its token_id is "
                                                         "then `<member>-<number>`)")


class TokenRecord(_OpenFleetAware):
    """A token's status: live tokens have the timing fields, settled ones come from the history."""

    token_id: str
    operation_type: str
    state: str
    settled: bool
    weight: str | None = None
    core_id: int | None = None
    worker_id: str | None = None
    attempt: int | None = None
    queue_wait: float | None = None
    run_time: float | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    kill_reason: str | None = None
    error: str | None = None
    member: str | None = Field(default=None, description="fleet mode: the member holding the token")


class KillResult(_FleetAware):
    """What a kill did: a token that has not started, or a running process-lane call (its process is ended)."""

    token_id: str
    killed: bool
    found: bool
    state: str | None = None
    message: str
    member: str | None = None


class OperationKillResult(_FleetAware):
    """How many not-yet-started calls of one operation were killed (fleet mode: on every member)."""

    operation_type: str
    killed: int
    fleet: FleetControl | None = None


class OperationState(_FleetAware):
    """The admission flags of one operation after a control action."""

    operation_type: str
    paused: bool
    held: bool
    blocked: bool
    fleet: FleetControl | None = Field(default=None, description="fleet mode: the members that applied it "
                                                                 "(the flags above are the answering member's)")


class OperationRunTime(_Open):
    """Seconds an operation's calls ran: ``min`` over every run; ``mean``, ``p95`` and ``max`` over recent ones."""

    min: float | None = None
    mean: float | None = None
    p95: float | None = None
    max: float | None = None
    samples: int | None = None


class OperationReputation(_OpenFleetAware):
    """One operation's reputation row (fields from the reputation policy) plus its admission flags.

    The reputation fields are null for an operation the reputation policy
    has not seen, or when it is not installed (a paused or held operation
    still gets a row, so it can be seen and resumed).

    Fleet mode: one row per operation over every live member (attempts,
    successes and failures summed; a flag set on any member; the worst
    health; the busiest member's run time), plus ``members``: each member's
    own row with its ``member``.
    """

    operation_type: str
    lane: str | None = Field(default=None, description="thread or process: the lane its most recent call in the "
                                                       "execution history ran on (null: none there)")
    health: str | None = Field(default=None, description="unknown, excellent, healthy, at_risk or problematic")
    attempts: int | None = None
    successes: int | None = None
    failures: int | None = None
    completion_rate: float | None = Field(default=None, description="successes / attempts, 0..1")
    run_time: OperationRunTime | None = None
    paused: bool = False
    held: bool = False
    blocked: bool = False


class QuarantineRecord(_Open):
    """One quarantined call (fields from the quarantine policy; never the raw arguments)."""

    id: str
    operation_type: str
    status: str
    trigger: str | None = None
    reason: str | None = None
    args_summary: str | None = None
    kwargs_summary: str | None = None
    created_at: float | None = None
    updated_at: float | None = None
    outcome_summary: str | None = None
    outcome_ok: bool | None = None
    claimed_by: str | None = Field(default=None, description="host:pid:start of the process releasing "
                                                             "(pending) or that released (released) it")
    claimed_at: float | None = None
    has_payload: bool | None = Field(default=None, description="the arguments are stored: the call can be released")
    payload_size: int | None = Field(default=None, description="bytes of the pickled arguments (kept or not)")
    payload_kept: bool | None = Field(default=None, description="false: the arguments were not stored or were "
                                                                "evicted by the retention policy (see payload_error)")
    payload_error: str | None = None


class QuarantineReleaseResult(BaseModel):
    """A released call: its updated record and the id of the new token now running it."""

    record: QuarantineRecord
    token_id: str


class DrainRequest(BaseModel):
    """Options of ``POST /drain`` (as a JSON body; the same names work as query parameters)."""

    # Strict: a JSON body says `true` and `5`, not `"yes"` or `false` for a number (lax pydantic
    # would read `"timeout": false` as 0 and drain without waiting).
    model_config = ConfigDict(strict=True)

    wait: bool = True
    timeout: float = Field(default=30.0, ge=0, le=300)


class DrainReport(_FleetAware):
    """What a drain saw. With ``wait=false`` it is the state right after the gate closed."""

    drained: bool
    settled_during_drain: int
    remaining: int
    elapsed: float
    fleet: FleetControl | None = Field(default=None, description="fleet mode: every member's report; the fields "
                                                                 "above are then the fleet's (all drained, sums, "
                                                                 "longest)")


class PoolState(_FleetAware):
    """Global admission state after ``/pause`` or ``/resume``."""

    pid: int
    phase: str
    paused: bool
    draining: bool
    inflight: int
    member: str | None = None
    fleet: FleetControl | None = None


class Health(_FleetAware):
    """Liveness: the event loop answers."""

    status: Literal["ok"] = "ok"
    pid: int
    member: str | None = None
    fleet: FleetHealth | None = None


class Ready(_FleetAware):
    """Readiness: ``ready`` only while running, every lane's workers up, and neither draining nor paused.

    ``starting``: the coordinator runs but some worker processes are not up
    yet (``processes_ready`` of ``processes``); they start with the server,
    in parallel, off the request path. ``cluster_unavailable``: the Dask lane
    is required and has no connection to its scheduler (``cluster``).
    """

    status: Literal["ready", "starting", "cluster_unavailable", "draining", "paused", "stopped"]
    ready: bool
    pid: int
    cluster: str | None = Field(default=None, description="the Dask lane's connection state (absent: no Dask lane); "
                                                          "a required lane not connected answers cluster_unavailable")
    processes: int | None = Field(default=None, description="worker processes of the process lane (null: no "
                                                            "process lane)")
    processes_ready: int | None = Field(default=None, description="of those, the ones up")
    member: str | None = Field(default=None, description="fleet mode: this process's member id (readiness is "
                                                         "always this process's own)")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting :class:`ErrorBody` for *statuses*."""
    return {status: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


_RETRY_AFTER_HEADER = {"Retry-After": {
    "description": "Whole seconds to wait before retrying (on every tokengate refusal).",
    "schema": {"type": "string", "pattern": "^[0-9]+$"}}}

_TOKEN_ERROR_DESCRIPTIONS: dict[int, str] = {
    409: "The call was not run: held for review (`token_quarantined`, with `quarantine_id`) "
         "or killed before it started (`token_killed`).",
    422: "Malformed input (`invalid_argument`, with FastAPI's `errors` list).",
    500: "The function raised; the app answered `function_failed` with the exception's type and message.",
    503: "Refused for now, retry after `Retry-After`: `overloaded`, `gate_closed` (draining or stopping), "
         "`operation_blocked`, `rejected` (a policy), `coordinator_stopped`, `coordinator_not_running`.",
    504: "The call's `timeout` tag expired (`token_timeout`).",
}
#: What a route whose calls run on the process lane can answer besides the above.
_PROCESS_LANE_DESCRIPTIONS: dict[int, str] = {
    500: "The call could not cross to its worker process or back (`pickling_failed`), its exception could not "
         "be sent back (`remote_error`), or it made a decorated call inside its worker process "
         "(`nested_call_refused`).",
    502: "The worker process running the call died (`worker_crashed`, with `pid`, `exitcode`, `signal_name`) "
         "or was ended (`worker_terminated`); it is replaced and later calls are served. The call may have "
         "run partly: retry only idempotent work.",
    503: "A worker process could not start (`worker_start_failed`) or the lane is closing (`lane_closed`).",
}


def tokengate_responses(*, validation: bool = True, function_failed: bool = False,
                        process_lane: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route that awaits tokens: every answer tokengate can give it.

    Documents, as :class:`ErrorBody`, what :func:`~tokengate_fastapi.add_exception_handlers`
    turns a refusal or an unfinished call into (409 quarantined or killed,
    503 with ``Retry-After``, 504 timed out), so clients and contract tests
    (schemathesis) see the real statuses and bodies::

        @app.get("/thumbnail", responses=tokengate_responses())
        async def thumbnail(...): ...

    Args:
        validation: Also document 422 as :class:`ErrorBody` (default). Right
            when the app installs :func:`~tokengate_fastapi.errors.request_validation_exception_handler`;
            pass False to keep FastAPI's own ``HTTPValidationError`` for 422.
        function_failed: Also document 500 ``function_failed``, for a route
            that answers its function's exception with that body itself
            (tokengate does not: an uncaught exception is the server's plain 500).
        process_lane: Also document what a call on the process lane can
            answer (``tags={"lane": "process"}``): 502 ``worker_crashed`` /
            ``worker_terminated``, 500 ``pickling_failed`` / ``remote_error`` /
            ``nested_call_refused``, and 503 ``worker_start_failed`` /
            ``lane_closed``.

    Returns:
        A new dict each call, to pass as ``responses=`` (merge it with the route's own).

    Raises:
        ConfigurationError: for a non-bool option.
    """
    if not all(isinstance(option, bool) for option in (validation, function_failed, process_lane)):
        raise ConfigurationError(f"tokengate_responses options are bools, got validation={validation!r}, "
                                 f"function_failed={function_failed!r}, process_lane={process_lane!r}")
    descriptions = {status: _TOKEN_ERROR_DESCRIPTIONS[status]
                    for status in [409, 503, 504] + ([422] if validation else []) + ([500] if function_failed else [])}
    if process_lane:
        for status, text in _PROCESS_LANE_DESCRIPTIONS.items():
            descriptions[status] = f"{descriptions[status]} {text}" if status in descriptions else text
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted(descriptions):
        entry: dict[str, Any] = {"model": ErrorBody, "description": descriptions[status]}
        if status == 503:
            entry["headers"] = dict(_RETRY_AFTER_HEADER)
        responses[status] = entry
    return responses
