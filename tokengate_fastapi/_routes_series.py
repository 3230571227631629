"""Admin route ``GET /history/series``: the recent past of a coordinator as time series.

Part of :func:`tokengate_fastapi.admin_router`, protected like the other
admin routes. The points come from the router's
:class:`~tokengate_fastapi._series.SeriesRecorders` (one sampler per
coordinator); the dashboard's charts poll this route with ``?after=`` and
append what is new.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Sequence

from fastapi import APIRouter, Query
from fastapi.params import Depends
from pydantic import BaseModel, ConfigDict, Field

from .dependencies import CoordinatorDep
from .schemas import error_responses
from ._series import SeriesRecorders

__all__ = ["add_series_routes", "SeriesResponse", "SeriesByWeight", "SeriesPercentiles", "SeriesRefusals"]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SeriesByWeight(_Closed):
    """One value per point for each weight class."""

    heavy: list[float | None]
    medium: list[float | None]
    light: list[float | None]


class SeriesPercentiles(_Closed):
    """p50 and p99 in seconds of the calls settled in each point's interval (null: none settled).

    Over the interval's most recent 512 calls (and at most the coordinator's ``history_size``).
    """

    p50: list[float | None]
    p99: list[float | None]


class SeriesRefusals(_Closed):
    """Refusals per second in each point's interval, by kind."""

    overloaded: list[float] = Field(description="Refused by admission: `Overloaded` (the pending limit) and any "
                                                "other `Rejected` that is neither a block nor a closed gate.")
    blocked: list[float] = Field(description="Refused because the reputation policy blocked the operation "
                                             "(0 without that policy).")
    closed: list[float] = Field(description="Rejected while the gate stayed closed through the interval "
                                            "(a drain): `GateClosed`, as far as the coordinator counts it.")
    quarantined: list[float] = Field(description="Held for review by the quarantine policy.")
    killed: list[float] = Field(description="Killed (by an operator, a cancelled awaiter, a stop).")
    timed_out: list[float] = Field(description="Settled by their `timeout` tag.")


class SeriesResponse(_Closed):
    """The sampled window, as columns: index *i* of every list is the point ``seq[i]``.

    Each point covers the ``interval`` seconds before its time ``t``; rates
    are per second over that interval, ``pending`` and ``busy_workers`` are
    read at ``t``. At most ``capacity`` points (``window / interval``) are
    kept, oldest dropped first.
    """

    pid: int = Field(description="The server process (each process of `--workers N` has its own coordinator).")
    started_at: float = Field(description="Wall-clock seconds when this recorder started: a change means a "
                                          "new coordinator (a restart), so `seq` started again.")
    interval: float = Field(description="Seconds between points.")
    window: float = Field(description="Seconds of history kept.")
    capacity: int = Field(description="Most points kept (`ceil(window / interval)`).")
    seq: list[int] = Field(description="Point numbers, increasing; pass the last one as `after` to get only "
                                       "newer points.")
    t: list[float] = Field(description="Wall-clock seconds (Unix time) at the end of each point's interval.")
    throughput: list[float] = Field(description="Calls settled per second (any outcome).")
    throughput_by_weight: SeriesByWeight = Field(description=(
        "Settled per second by weight class (the classes' shares of the interval's calls in the execution "
        "history); null when the shares are unknown."))
    queue_wait: SeriesPercentiles = Field(description="Creation to start on a worker.")
    run_time: SeriesPercentiles = Field(description="The function's own wall time.")
    pending: dict[str, list[int]] = Field(description="Calls waiting per weight class (`heavy`, `medium`, "
                                                      "`light`), all lanes, at each point.")
    busy_workers: dict[str, list[int | None]] = Field(description=(
        "Workers running a call per domain (core id as a string), all lanes, at each point."))
    workers: dict[str, int] = Field(description="Active workers per domain at the last sample (the scale of "
                                                "`busy_workers`).")
    refusals: SeriesRefusals
    draining: list[bool] = Field(description="The gate was closed by a drain at the point.")
    paused: list[bool] = Field(description="Admission was paused globally at the point.")


def add_series_routes(router: APIRouter, *, name: Callable[[str], str], protected: Sequence[Depends],
                      recorders: SeriesRecorders) -> None:
    """Add ``GET /history/series`` to *router*; *protected* is the auth dependency list."""

    @router.get("/history/series", response_model=SeriesResponse, name=name("history_series"),
                dependencies=list(protected), responses=error_responses(401, 422, 503),
                summary="Time series of the recent past")
    async def history_series(
        coordinator: CoordinatorDep,
        after: Annotated[int | None, Query(ge=-1, le=2**53, description=(
            "Only points whose `seq` is greater (the last `seq` you have); omit for the whole window."))] = None,
    ) -> dict[str, Any]:
        """Throughput, latency percentiles, pending, busy workers and refusals over the last ``window`` seconds.

        Sampled server-side every ``series_interval`` seconds (default 1) and
        kept for ``series_window`` seconds (default 300), so the series start
        when the app does, not when someone asks. The first request of a
        coordinator whose sampler was not started with the app starts it.
        """
        return recorders.recorder(coordinator).snapshot(after)
