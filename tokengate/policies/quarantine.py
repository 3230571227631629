"""Quarantine: hold anomalous calls for operator review instead of running them.

:class:`QuarantinePolicy` refuses a call in ``before_submit`` and persists it
(:mod:`tokengate.quarantine.store`) when one of three triggers fires:

* ``argument_spike``: the call's argument footprint (a cheap estimate, see
  :func:`footprint`) is more than ``spike_factor`` times the operation's recent
  p99 footprint, once ``spike_min_samples`` accepted calls were seen, and above
  ``spike_min_bytes`` (so a 300-byte string after a run of small ints is not an
  anomaly). The p99 comes from a bounded window of accepted calls per operation.
* ``poison_call``: the same operation and argument fingerprint
  (:func:`tokengate.fingerprint.routing_key`, STANDARD, kept only as a 16-hex
  digest in a bounded LRU) failed ``poison_failures`` times in a row, or
  exhausted its retries (``token.policy_data["retries_exhausted"]``); the *next*
  such call is held. A success clears its count; exception types listed in
  ``poison_ignore`` (expected errors such as "not found") never count. Plain
  objects are fingerprinted by identity, so they rarely match. Checking costs a
  fingerprint per call only for operations with a recorded failure.
* ``held_operation``: an operator called :meth:`QuarantinePolicy.hold`.

Writing the record, and when the caller hears about it:
    A call is reported quarantined only once its record is committed, so an
    acknowledged record is never lost. The database is written by one writer
    thread (:mod:`tokengate.quarantine.writer`), never by the submitting
    thread, with a bounded queue (``queue_size``). A call made from a thread
    that runs no event loop (sync code, a worker thread) waits up to
    ``write_timeout`` and gets :class:`~tokengate.errors.TokenQuarantined` at
    call time; a call made on an event loop must not block it, so it returns
    its token at once, held (state WAITING) until the record is written, and
    its awaiter gets ``TokenQuarantined`` (carrying ``quarantine_id`` and
    ``trigger``). So does a retry held on re-admission.

Fail-open, precisely:
    When the record cannot be committed within ``write_timeout`` (another
    process holds the lock, the disk is slow), or the write fails (read-only,
    full or corrupt file), or the database cannot be opened, or the writer's
    queue is full, or ``max_records`` records are already pending, the call is
    **admitted**: it runs as if no trigger had fired. Nothing is dropped: every
    accepted call either runs or is durably quarantined. A record committed
    after its call was admitted (a timeout racing the COMMIT) is marked
    discarded with a note, so it can never be released and run a second time.
    Failures are logged at ERROR at most once per ``log_interval`` seconds (with
    a count of the ones held back) and counted in ``stats()["store_errors"]``;
    an unopenable database is retried every ``retry_interval`` seconds.

The operator API --
:meth:`~QuarantinePolicy.list`, :meth:`~QuarantinePolicy.get`,
:meth:`~QuarantinePolicy.release`, :meth:`~QuarantinePolicy.discard` -- works on
the persisted records, also after a restart (release needs the decorated
function to be importable).

Trust boundary: each record's payload is a **pickle** of the call's arguments,
and releasing a record unpickles it, which runs code chosen by whoever can
write the database file. The store creates the file owner-only (``0o600``);
keep it in a directory only the service account can write, and never release
records from a database you did not create. The summaries shown by
``list``/``get`` are plain text and safe.

Threads: ``before_submit`` runs on the submitting thread; ``after_run`` and
``on_settle`` on the loop (``on_settle`` of a call refused at submission on the
submitting thread). All in-memory state is guarded by one lock that is never
held while user code (pickling, ``__repr__``) or the database runs.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import logging
import math
import os
import reprlib
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..decorator import resolve_guarded
from ..errors import ConfigurationError, CoordinatorNotRunning, TokenQuarantined, describe_exception
from ..fingerprint import DigestPolicy, HashPolicy, digest, routing_key
from ..policy import Policy
from .footprint import Footprints as _Footprints, footprint
from ..quarantine.store import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_MAX_RECORDS,
    DEFAULT_MAX_TOTAL_PAYLOAD_BYTES,
    DEFAULT_PATH,
    QuarantineStateError,
    QuarantineStatus,
    QuarantineStore,
    QuarantineStoreError,
)
from ..quarantine.writer import PendingWrite, QuarantineWriter, Throttled, WriteState
from ..states import TokenState

if TYPE_CHECKING:
    from ..policy import PolicyHost
    from ..token import TaskToken

__all__ = ["QuarantinePolicy", "footprint", "TRIGGERS"]

logger = logging.getLogger(__name__)

SPIKE, POISON, HELD = "argument_spike", "poison_call", "held_operation"
TRIGGERS = (SPIKE, POISON, HELD)

_RELEASE_KEY = "quarantine.release_id"  # policy_data: this token is a released record
_FP_KEY = "quarantine.fingerprint"  # policy_data: the call's fingerprint digest, once computed
_WRITE_KEY = "quarantine.write"  # policy_data: the PendingWrite of a call held until its record is written
_get_running_loop = asyncio._get_running_loop
_HOLD, _QUARANTINE, _ADMIT = 0, 1, 2
_OUTCOME_REPR = reprlib.Repr()
_OUTCOME_REPR.maxstring = 200
_OUTCOME_REPR.maxother = 200


def _outcome_summary(token: TaskToken[Any]) -> str:
    outcome = token.outcome
    try:
        if token.is_error:
            text = describe_exception(outcome)
        else:
            text = "returned " + _OUTCOME_REPR.repr(outcome)
    except Exception:
        text = f"<unrepresentable {type(outcome).__name__}>"
    return f"{token.state.value}: {text}"


class QuarantinePolicy(Policy):
    """Hold anomalous calls (argument spikes, poison calls, held operations) for review.

    Args:
        store: A :class:`~tokengate.quarantine.store.QuarantineStore` (the
            caller owns and closes it), a database path, or ``None`` for
            ``"tokengate-quarantine.sqlite3"`` in the current directory. A path
            is made absolute now and opened (created owner-only) at coordinator
            start; the policy closes the database it opened at stop.
            ``":memory:"`` keeps records only for this process.
        spike_factor: How many times the recent p99 footprint makes a spike.
        spike_min_samples: Accepted calls of an operation needed before spikes
            are judged.
        spike_min_bytes: A footprint at or below this is never a spike.
        spike_window: Accepted footprints kept per operation (>= spike_min_samples).
        spike_baseline_half_life: Seconds for the remembered p99 to halve: a
            burst of small calls cannot drag the spike limit below half its
            level in that time (``math.inf``: never lower it). See
            :class:`~tokengate.policies.footprint.Footprints`.
        poison_failures: Consecutive failures of one fingerprint that make its
            next call poison.
        poison_capacity: Fingerprints whose failures are remembered (LRU).
        poison_ignore: Exception types that are normal outcomes (e.g. a
            not-found error) and never count as failures.
        write_timeout: Seconds a held call waits for its record to be
            committed before it is admitted instead (also the database's busy
            timeout for a store this policy opens).
        queue_size: Records waiting for the writer thread at most; past it an
            anomalous call is admitted.
        log_interval: Seconds between two logged database failures.
        retry_interval: Seconds between attempts to open an unopenable database.
        max_records, max_total_payload_bytes, max_payload_bytes: Retention
            limits of a store this policy opens (see
            :class:`~tokengate.quarantine.store.QuarantineStore`); give them to
            the store itself when passing a store.
        clock: Monotonic seconds, for the spike baseline (tests pass a fake).

    Raises:
        ConfigurationError: for any invalid option, at construction.
    """

    name = "quarantine"

    def __init__(
        self,
        store: QuarantineStore | str | os.PathLike[str] | None = None,
        *,
        spike_factor: float = 8.0,
        spike_min_samples: int = 50,
        spike_min_bytes: int = 64 * 1024,
        spike_window: int = 256,
        spike_baseline_half_life: float = 600.0,
        poison_failures: int = 3,
        poison_capacity: int = 10_000,
        poison_ignore: Iterable[type[BaseException]] = (),
        write_timeout: float = 2.0,
        queue_size: int = 1024,
        log_interval: float = 60.0,
        retry_interval: float = 5.0,
        max_records: int | None = None,
        max_total_payload_bytes: int | None = None,
        max_payload_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(spike_factor, bool) or not isinstance(spike_factor, (int, float)) or not spike_factor >= 1:
            raise ConfigurationError(f"spike_factor must be a number >= 1, got {spike_factor!r}")
        _check_int("spike_min_samples", spike_min_samples, 1)
        _check_int("spike_min_bytes", spike_min_bytes, 0)
        _check_int("spike_window", spike_window, spike_min_samples,
                   hint=f" (at least spike_min_samples={spike_min_samples}, or spikes could never be judged)")
        _check_int("poison_failures", poison_failures, 1)
        _check_int("poison_capacity", poison_capacity, 1)
        _check_int("queue_size", queue_size, 1)
        for option, seconds, allow_inf in (("spike_baseline_half_life", spike_baseline_half_life, True),
                                           ("write_timeout", write_timeout, False),
                                           ("log_interval", log_interval, False),
                                           ("retry_interval", retry_interval, False)):
            if (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0
                    or (math.isinf(seconds) and not allow_inf) or math.isnan(seconds)):
                raise ConfigurationError(f"{option} must be a positive number of seconds"
                                         f"{'' if allow_inf else ' (finite)'}, got {seconds!r}")
        if not callable(clock):
            raise ConfigurationError(f"clock must be callable, got {clock!r}")
        limits = {"max_records": max_records, "max_total_payload_bytes": max_total_payload_bytes,
                  "max_payload_bytes": max_payload_bytes}
        if isinstance(store, QuarantineStore) and any(v is not None for v in limits.values()):
            raise ConfigurationError("max_records, max_total_payload_bytes and max_payload_bytes apply to a "
                                     "store the policy opens; pass them to QuarantineStore(...) instead")
        self._store_limits: dict[str, int | None] = {
            "max_records": DEFAULT_MAX_RECORDS if max_records is None else max_records,
            "max_total_payload_bytes": (DEFAULT_MAX_TOTAL_PAYLOAD_BYTES if max_total_payload_bytes is None
                                        else max_total_payload_bytes),
            "max_payload_bytes": DEFAULT_MAX_PAYLOAD_BYTES if max_payload_bytes is None else max_payload_bytes,
        }
        if not isinstance(store, QuarantineStore):
            # Validated now, not at start: build (and drop) a store object's checks without a file.
            QuarantineStore(":memory:", timeout=float(write_timeout), **self._store_limits).close()
        ignore = tuple(poison_ignore)
        for tp in ignore:
            if not (isinstance(tp, type) and issubclass(tp, BaseException)):
                raise ConfigurationError(f"poison_ignore must hold exception types, got {tp!r}")
        self._owns_store = not isinstance(store, QuarantineStore)
        if isinstance(store, QuarantineStore):
            self._store: QuarantineStore | None = store
            self._path = store.path
        elif store is None or isinstance(store, (str, os.PathLike)):
            path = os.fspath(DEFAULT_PATH if store is None else store)
            self._path = path if path == ":memory:" else os.path.abspath(path)
            self._store = None
        else:
            raise ConfigurationError(
                f"store must be a QuarantineStore, a path or None, got {type(store).__name__} {store!r}")
        self.spike_factor = float(spike_factor)
        self.spike_min_samples = spike_min_samples
        self.spike_min_bytes = spike_min_bytes
        self.spike_window = spike_window
        self.spike_baseline_half_life = float(spike_baseline_half_life)
        self.write_timeout = float(write_timeout)
        self.queue_size = queue_size
        self.log_interval = float(log_interval)
        self.retry_interval = float(retry_interval)
        self._clock = clock
        self.poison_failures = poison_failures
        self.poison_capacity = poison_capacity
        self.poison_ignore: tuple[type[BaseException], ...] = ignore
        self._coordinator: PolicyHost | None = None
        self._store_lock = threading.Lock()  # guards opening/closing self._store
        self._local = threading.local()  # .release_id: set by release() around its submit
        self._lock = threading.Lock()  # guards everything below
        # Read without the lock on the hot path: replaced, never mutated.
        self._held: frozenset[str] = frozenset()
        self._poison_ops: frozenset[str] = frozenset()
        self._poison_op_entries: dict[str, int] = {}
        self._failures: collections.OrderedDict[tuple[str, str], tuple[int, bool]] = collections.OrderedDict()
        self._footprints: dict[str, _Footprints] = {}
        self._releasing: set[str] = set()
        self._releases_submitting = 0  # release() calls inside coordinator.submit (hot-path guard)
        self._quarantined = {t: 0 for t in TRIGGERS}
        self._store_errors = 0
        self._orphans_discarded = 0
        self._writer: QuarantineWriter | None = None
        self._admitted_log = Throttled(logger, self.log_interval)
        self._open_log = Throttled(logger, self.log_interval)

    # -- lifecycle -------------------------------------------------------------

    def on_start(self, coordinator: PolicyHost) -> None:
        """Bind to *coordinator* and start the writer thread, which opens the database.

        Waits up to ``write_timeout`` for the database to open (an error is
        logged, not raised: anomalous calls are admitted until it opens).
        """
        if self._writer is not None:  # started again without a stop: never two writer threads
            self._stop_writer()
        with self._store_lock:
            store, self._store = self._store, None
        writer = QuarantineWriter(store, self._new_store if self._owns_store else None, on_done=self._write_done,
                                  queue_size=self.queue_size, retry_interval=self.retry_interval,
                                  log_interval=self.log_interval, name=f"tokengate-quarantine-{coordinator.name}")
        writer.failures = self._open_log
        self._writer = writer
        self._coordinator = coordinator
        try:
            writer.start(open_wait=self.write_timeout)
        except BaseException:
            self._writer = self._coordinator = None
            writer.stop(0)
            raise

    def on_stop(self, coordinator: PolicyHost) -> None:
        """Unbind; stop and join the writer thread (it closes the database if this policy opened it)."""
        self._coordinator = None
        self._stop_writer()
        self.close()

    def _stop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None and not writer.stop(self.write_timeout + 1.0):
            logger.error("quarantine writer thread did not stop within %.1f s", self.write_timeout + 1.0)

    def close(self) -> None:
        """Close a database this policy opened (e.g. after using the operator API without a coordinator)."""
        if self._owns_store:
            with self._store_lock:
                store, self._store = self._store, None
            if store is not None:
                store.close()

    def _new_store(self) -> QuarantineStore:
        return QuarantineStore(self._path, timeout=self.write_timeout, **self._store_limits)

    def _open_store(self) -> QuarantineStore | None:
        """The store to use now: the writer's while running, else this policy's (opened on first use)."""
        writer = self._writer
        if writer is not None:
            return writer.store
        store = self._store
        if store is not None or not self._owns_store:
            return store
        with self._store_lock:
            if self._store is None:
                try:
                    self._store = self._new_store()
                except QuarantineStoreError as exc:
                    self._open_log(logging.ERROR, "cannot open the quarantine database %s (%s); anomalous calls "
                                   "will be admitted", self._path, exc)
            return self._store

    def _require_store(self) -> QuarantineStore:
        store = self._open_store()
        if store is None:
            raise QuarantineStoreError(f"quarantine database {self._path!r} cannot be opened (see the log)")
        return store

    # -- hooks -------------------------------------------------------------------

    def before_submit(self, token: TaskToken[Any]) -> None:
        """Quarantine the call if a trigger fires (raises TokenQuarantined), else record its footprint."""
        data = token.policy_data
        if data is not None and _RELEASE_KEY in data:
            return  # a released call, or a retry of one: never held again by this policy
        if self._releases_submitting and self._claim_release(token):
            return
        op = token.operation_type
        args, kwargs = token.args, token.kwargs
        if args is None or kwargs is None:
            return
        if op in self._held:
            self._hold_for_review(token, HELD, f"operation {op!r} is on hold")
            return
        if op in self._poison_ops:
            fp = data.get(_FP_KEY) if data is not None else None
            if fp is None:
                fp = self._fingerprint_of(token)
            if fp is not None:
                with self._lock:
                    count, exhausted = self._failures.get((op, fp), (0, False))
                if count >= self.poison_failures:
                    why = "exhausted its retries" if exhausted else f"failed {count} times in a row"
                    self._hold_for_review(token, POISON, f"an identical {op} call {why}")
                    return
        if token.attempt > 1:
            return  # a retry carries the arguments already measured at its first submission
        size = footprint(args, kwargs)
        with self._lock:
            window = self._footprints.get(op)
            if window is None:
                window = self._footprints[op] = _Footprints(self.spike_window, self.spike_min_samples,
                                                            self.spike_baseline_half_life, self._clock)
            if size <= window.limit:
                window.add(size, self.spike_factor, self.spike_min_bytes)
                return
            p99 = round(window.baseline)
        self._hold_for_review(token, SPIKE, (
            f"argument footprint ~{size} bytes exceeds {self.spike_factor:g} x the recent p99 ({p99} bytes)"))

    def _claim_release(self, token: TaskToken[Any]) -> bool:
        """Mark *token* as the one release() is submitting on this thread, if it is."""
        release_id = getattr(self._local, "release_id", None)
        if release_id is None:
            return False
        self._local.release_id = None  # only the one token release() submits
        if token.policy_data is None:
            token.policy_data = {}
        token.policy_data[_RELEASE_KEY] = release_id
        return True

    def admit(self, token: TaskToken[Any]) -> bool:
        """Hold a call whose record is being written; quarantine it once written, else let it run.

        Thread: the submitting thread, or any thread that hands the token back
        (the writer thread when the record is written, the loop at the deadline).
        """
        data = token.policy_data
        entry = data.get(_WRITE_KEY) if data is not None else None
        if entry is None:
            return True
        verdict = self._verdict(entry, hold=True)
        if verdict == _HOLD:
            return False
        assert data is not None
        del data[_WRITE_KEY]
        if verdict == _QUARANTINE:
            self._raise_quarantined(token, entry)
        self._admitted_after(entry)
        return True

    def after_run(self, token: TaskToken[Any]) -> float | None:
        """Count a failure of the call's fingerprint; a success clears it. Thread: loop."""
        data = token.policy_data
        fp = data.get(_FP_KEY) if data is not None else None
        if not token.is_error:
            if fp is not None:
                self._forget_failure(token.operation_type, fp)
            return None
        if self.poison_ignore and isinstance(token.outcome, self.poison_ignore):
            return None  # an expected error: neither a failure nor a success
        if fp is None:
            fp = self._fingerprint_of(token)
        if fp is not None:
            self._record_failure(token.operation_type, fp, exhausted=False)
        return None

    def on_settle(self, token: TaskToken[Any]) -> None:
        """Mark retry exhaustion as poison; store the outcome of a released call."""
        data = token.policy_data
        if not data:
            return
        entry = data.pop(_WRITE_KEY, None)
        if entry is not None:
            # Settled while its record was being written (killed, stopped, refused by a later policy).
            self._give_up(entry)
        if data.get("retries_exhausted"):
            fp = data.get(_FP_KEY)
            if fp is None:
                fp = self._fingerprint_of(token)
            if fp is not None:
                self._record_failure(token.operation_type, fp, exhausted=True)
        release_id = data.get(_RELEASE_KEY)
        if release_id is not None:
            self._finish_release(release_id, token)

    # -- triggers and bookkeeping ---------------------------------------------------

    def _hold_for_review(self, token: TaskToken[Any], trigger: str, reason: str) -> None:
        """A trigger fired: have the record written, then quarantine the call (or admit it, failing open).

        On a thread without an event loop: waits up to ``write_timeout`` and
        raises TokenQuarantined, or returns (admitted). On an event loop:
        marks the token so that ``admit`` holds it until the writer reports,
        with a deadline of ``write_timeout`` on that loop. A ``":memory:"``
        store cannot block, so it is written at once on any thread.
        """
        op = token.operation_type
        guarded = token.guarded
        writer = self._writer
        if writer is None or guarded is None:
            self._admit_unwritten(op, trigger, reason, "the quarantine policy is not running")
            return
        entry = PendingWrite(op, guarded.module, guarded.qualname, trigger, reason, token.args or (),
                             dict(token.kwargs or {}), token)
        store = writer.store
        if store is not None and store.path == ":memory:":
            # No other process and no disk: this write cannot block, so it is made
            # here and the caller hears "quarantined" at call time, even on a loop.
            try:
                entry.record = store.add(op, guarded.module, guarded.qualname, trigger, reason,
                                         token.args or (), token.kwargs or {})
            except QuarantineStoreError as exc:
                entry.error = exc
                self._admitted_after(entry)
                return
            self._raise_quarantined(token, entry)
        if not writer.submit(entry):
            why = ("the quarantine database is not open" if writer.store is None
                   else f"the writer's queue is full ({self.queue_size} records waiting)")
            self._admit_unwritten(op, trigger, reason, why)
            return
        loop = _get_running_loop()
        if loop is None:
            # Sync code or a worker thread: waiting here blocks no event loop.
            entry.done.wait(self.write_timeout)
            if self._verdict(entry, hold=False) == _QUARANTINE:
                self._raise_quarantined(token, entry)
            self._admitted_after(entry)
            return
        if token.policy_data is None:
            token.policy_data = {}
        token.policy_data[_WRITE_KEY] = entry
        entry.timer = loop.call_later(self.write_timeout, self._deadline, entry)

    def _verdict(self, entry: PendingWrite, *, hold: bool) -> int:
        """_QUARANTINE once written; _HOLD while being written (with *hold*, recording that admit holds it);
        else _ADMIT (failed, abandoned or orphaned; without *hold*, a write in progress is given up)."""
        with entry.lock:
            state = entry.state
            if state is WriteState.WRITTEN and not entry.orphaned:
                return _QUARANTINE
            if state in (WriteState.WAITING, WriteState.COMMITTING) and not entry.orphaned:
                if hold:
                    entry.held = True
                    return _HOLD
                if state is WriteState.WAITING:
                    entry.state = WriteState.ABANDONED
                else:
                    entry.orphaned = True  # the writer discards the record if its COMMIT lands
            return _ADMIT

    def _give_up(self, entry: PendingWrite) -> bool:
        """Stop waiting for *entry*'s record; True if the call must now be admitted by whoever holds it."""
        return self._verdict(entry, hold=False) == _ADMIT

    def _deadline(self, entry: PendingWrite) -> None:
        """``write_timeout`` passed for a call held on a loop: admit it unless its record is written. Thread: loop."""
        entry.timer = None
        with entry.lock:
            if entry.state is WriteState.WRITTEN and not entry.orphaned:
                return  # the writer's callback releases it (or already did)
            held = entry.held
        if self._give_up(entry):
            self._admitted_after(entry)
            token = entry.token
            coordinator = self._coordinator
            if held and token is not None and coordinator is not None:
                coordinator.release_held(token)

    def _write_done(self, entry: PendingWrite) -> None:
        """The writer finished *entry* (written or failed). Thread: the writer."""
        with entry.lock:
            orphan = entry.orphaned and entry.state is WriteState.WRITTEN
            held = entry.held
        if orphan and entry.record is not None:
            self._discard_orphan(entry.record.id, entry)
            return  # its call was admitted or settled otherwise; whoever did that released it
        if entry.state is WriteState.FAILED:
            self._admitted_after(entry)
        timer = entry.timer
        token = entry.token
        if timer is not None and token is not None:
            entry.timer = None
            try:
                token.get_loop().call_soon_threadsafe(timer.cancel)
            except RuntimeError:  # that loop is closed: its timer will never fire anyway
                pass
        coordinator = self._coordinator
        if held and token is not None and coordinator is not None:
            coordinator.release_held(token)

    def _discard_orphan(self, record_id: str, entry: PendingWrite) -> None:
        store = self._open_store()
        note = (f"not held: the call was admitted or settled before this record was committed "
                f"(write_timeout={self.write_timeout:g} s)")
        try:
            if store is not None:
                store.mark_discarded(record_id, note=note)
        except (KeyError, QuarantineStateError, QuarantineStoreError) as exc:
            logger.error("quarantine record %s was committed after its %s call was admitted and could not be "
                         "marked discarded: %s; do not release it", record_id, entry.operation_type, exc)
            return
        with self._lock:
            self._orphans_discarded += 1
        logger.warning("quarantine record %s (%s) was committed after its call was admitted; marked discarded",
                       record_id, entry.operation_type)

    def _admitted_after(self, entry: PendingWrite) -> None:
        with entry.lock:  # several paths may see the same failure; it is one admitted call
            if entry.reported:
                return
            entry.reported = True
        error = entry.error
        why = (f"{type(error).__name__}: {error}" if error is not None
               else f"its record was not written within write_timeout={self.write_timeout:g} s")
        self._admit_unwritten(entry.operation_type, entry.trigger, entry.reason, why)

    def _admit_unwritten(self, op: str, trigger: str, reason: str, why: str) -> None:
        with self._lock:
            self._store_errors += 1
        self._admitted_log(logging.ERROR, "quarantine could not store a %s call (%s: %s): %s; the call is "
                           "admitted instead", op, trigger, reason, why)

    def _raise_quarantined(self, token: TaskToken[Any], entry: PendingWrite) -> None:
        record = entry.record
        assert record is not None
        op, trigger = token.operation_type, entry.trigger
        with self._lock:
            self._quarantined[trigger] += 1
        logger.warning("quarantined a %s call as %s (%s): %s", op, record.id, trigger, entry.reason)
        raise TokenQuarantined(
            f"{op} call was quarantined ({trigger}: {entry.reason}); an operator can release or discard it "
            f"with id {record.id!r}", operation_type=op, quarantine_id=record.id, trigger=trigger)

    def _fingerprint_of(self, token: TaskToken[Any]) -> str | None:
        args, kwargs = token.args, token.kwargs
        if args is None or kwargs is None:
            return None
        fp = _digest(token.operation_type, args, kwargs)
        if fp is not None:
            if token.policy_data is None:
                token.policy_data = {}
            token.policy_data[_FP_KEY] = fp
        return fp

    def _record_failure(self, op: str, fp: str, *, exhausted: bool) -> None:
        key = (op, fp)
        with self._lock:
            failures = self._failures
            old = failures.pop(key, None)
            if old is None:
                self._entries_changed(op, +1)
                old = (0, False)
            count = max(old[0], self.poison_failures) if exhausted else old[0] + 1
            failures[key] = (count, old[1] or exhausted)
            while len(failures) > self.poison_capacity:
                (old_op, _), _ = failures.popitem(last=False)
                self._entries_changed(old_op, -1)

    def _forget_failure(self, op: str, fp: str) -> None:
        with self._lock:
            if self._failures.pop((op, fp), None) is not None:
                self._entries_changed(op, -1)

    def _entries_changed(self, op: str, delta: int) -> None:
        """Keep per-operation LRU entry counts and the hot-path set. Caller holds the lock."""
        entries = self._poison_op_entries
        n = entries.get(op, 0) + delta
        if n > 0:
            entries[op] = n
            if delta > 0 and n == 1:
                self._poison_ops = self._poison_ops | {op}
        else:
            entries.pop(op, None)
            self._poison_ops = self._poison_ops - {op}

    def _finish_release(self, record_id: str, token: TaskToken[Any]) -> None:
        # The id stays in _releasing until the record is updated: until then it
        # is still pending in the database, and a second release must be refused.
        if token.attempt == 1 and token.started_at is None:
            # Never ran (refused, killed or timed out before a worker took it): keep it pending.
            logger.warning("released quarantined call %s settled as %s without running; it stays pending",
                           record_id, token.state.value)
            self._unclaim(record_id)
            return
        ok = token.state is TokenState.COMPLETED
        summary, state = _outcome_summary(token), token.state.value

        def mark(store: QuarantineStore | None) -> None:
            try:
                if store is None:
                    raise QuarantineStoreError(f"the quarantine database {self._path!r} is unavailable")
                store.mark_released(record_id, ok, summary)
            except (KeyError, QuarantineStateError, QuarantineStoreError) as exc:
                logger.error("released quarantined call %s ran (%s) but its record could not be updated: %s",
                             record_id, state, exc)
            finally:
                with self._lock:
                    self._releasing.discard(record_id)

        self._store_job(mark)

    def _unclaim(self, record_id: str, *, inline: bool = False) -> None:
        # The call did not run: let any process release it again. Never raises
        # (it runs on settle paths); a claim left behind is logged, and it ends
        # by itself once this process exits.
        def unclaim(store: QuarantineStore | None) -> None:
            try:
                if store is None:
                    raise QuarantineStoreError(f"the quarantine database {self._path!r} is unavailable")
                store.unclaim(record_id)
            except QuarantineStoreError as exc:
                logger.error("quarantined call %s: could not end this process's release claim: %s", record_id, exc)
            finally:
                with self._lock:
                    self._releasing.discard(record_id)

        self._store_job(unclaim, inline=inline)

    def _store_job(self, job: Callable[[QuarantineStore | None], None], *, inline: bool = False) -> None:
        """Run a record update on the writer thread (on_settle runs on the loop); inline without a writer.

        The job gets None when the database is unavailable (it must still end its bookkeeping).
        """
        writer = self._writer
        if not inline and writer is not None and writer.run_job(job):
            return
        job(self._open_store())

    # -- operator API ------------------------------------------------------------------

    def hold(self, operation_type: str) -> None:
        """Quarantine every new call of *operation_type* until :meth:`unhold`. Thread: any.

        Raises:
            ConfigurationError: *operation_type* is not a non-empty string, or
                ``MAX_HELD_OPERATIONS`` operation types are already on hold
                (names from admin requests must not grow memory without bound).
        """
        _check_op(operation_type)
        with self._lock:
            if operation_type not in self._held and len(self._held) >= MAX_HELD_OPERATIONS:
                raise ConfigurationError(
                    f"{len(self._held)} operation types are already on hold (the limit is {MAX_HELD_OPERATIONS}); "
                    "unhold some first")
            self._held = self._held | {operation_type}
        logger.warning("quarantine: operation %r is on hold; its new calls are quarantined", operation_type)

    def unhold(self, operation_type: str) -> None:
        """Stop holding *operation_type* (already quarantined calls stay pending). Thread: any."""
        _check_op(operation_type)
        with self._lock:
            self._held = self._held - {operation_type}
        logger.warning("quarantine: operation %r is no longer on hold", operation_type)

    def held_operations(self) -> builtins.list[str]:
        """The operation types currently on hold, sorted."""
        return sorted(self._held)

    def list(
        self,
        status: QuarantineStatus | str | None = None,
        operation_type: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> builtins.list[dict[str, Any]]:
        """Records newest first as JSON-ready dicts (no payload), filtered and paginated.

        Raises:
            ConfigurationError: for a bad filter or page argument.
            QuarantineStoreError: if the database fails.
        """
        return [r.to_dict() for r in self._require_store().list(status, operation_type, limit, offset)]

    def get(self, id: str) -> dict[str, Any] | None:
        """One record as a JSON-ready dict (no payload), or None."""
        record = self._require_store().get(id)
        return None if record is None else record.to_dict()

    def release(self, id: str, *, force: bool = False) -> TaskToken[Any]:
        """Re-run a pending quarantined call through the normal path and return its token.

        The call is submitted to the running coordinator like a new one: every
        other policy still applies, this one does not hold it again. When the
        token settles after running, the record becomes RELEASED with a summary
        of the result or error; if it settles without running (refused, killed,
        timed out first) the record stays PENDING. Works after a restart as long
        as the decorated function can be imported.

        Before submitting, the record is claimed in the database, so another
        process sharing the file cannot release it at the same time (see
        :meth:`QuarantineStore.claim`). ``force=True`` takes over a claim held
        by another process: use it only when that process is known to be gone
        (a claim of a dead process on this host is taken over without it).

        Raises:
            KeyError: no record has this id.
            QuarantineStateError: the record is not pending, is being released
                (here or by another process), has no replayable payload, or
                its function cannot be found.
            CoordinatorNotRunning: the policy's coordinator is not running.
            Rejected: another policy refused the call (the record stays pending).
        """
        coordinator = self._coordinator
        if coordinator is None or not coordinator.running:
            raise CoordinatorNotRunning("release() needs the quarantine policy's coordinator to be running")
        store = self._require_store()
        record = store.get(id)
        if record is None:
            raise KeyError(f"no quarantined call with id {id!r}")
        if record.status is not QuarantineStatus.PENDING:
            raise QuarantineStateError(
                f"quarantined call {id} is {record.status.value}, not pending; only pending calls can be released")
        if not record.has_payload:
            raise QuarantineStateError(
                f"quarantined call {id} cannot be replayed: its arguments were not stored "
                f"({record.payload_error or 'unknown reason'}); discard it instead")
        try:
            guarded = resolve_guarded(record.func_module, record.func_qualname)
        except LookupError as exc:
            raise QuarantineStateError(
                f"cannot release quarantined call {id}: {exc}; make it importable, or discard the call") from exc
        try:
            args, kwargs = store.load_payload(id)
        except ValueError as exc:
            raise QuarantineStateError(f"cannot release quarantined call {id}: {exc}") from exc
        with self._lock:
            if id in self._releasing:
                raise QuarantineStateError(f"quarantined call {id} is already being released")
            self._releasing.add(id)
        try:
            store.claim(id, take_over=force)  # refuses while another process releases it
        except BaseException:
            with self._lock:
                self._releasing.discard(id)
            raise
        with self._lock:
            self._releases_submitting += 1
        self._local.release_id = id
        try:
            token = coordinator.submit(guarded, args, kwargs)
        except BaseException:
            with self._lock:
                self._releasing.discard(id)
            self._unclaim(id, inline=True)  # the caller thread: release() is an operator action, not the loop
            raise
        finally:
            self._local.release_id = None
            with self._lock:
                self._releases_submitting -= 1
        logger.warning("released quarantined call %s (%s) as token %s", id, record.operation_type, token.token_id)
        return token

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record write and update queued so far is done (True), or *timeout* passes.

        A released call's outcome is stored by the writer thread just after
        the call settles (``on_settle`` runs on the event loop, which must not
        wait for the database); this waits for it. True at once when no
        coordinator runs (updates are then made inline).
        """
        writer = self._writer
        return True if writer is None else writer.flush(timeout)

    def discard(self, id: str) -> dict[str, Any]:
        """Mark a pending record DISCARDED (it never runs) and return it.

        Raises:
            KeyError: no record has this id.
            QuarantineStateError: the record is not pending or is being released.
        """
        with self._lock:
            if id in self._releasing:
                raise QuarantineStateError(f"quarantined call {id} is being released; it cannot be discarded")
        record = self._require_store().mark_discarded(id)
        logger.warning("discarded quarantined call %s (%s)", id, record.operation_type)
        return record.to_dict()

    def stats(self) -> dict[str, Any]:
        """JSON-ready: records by status, quarantines by trigger (this process), holds, path, limits."""
        writer = self._writer
        store = writer.store if writer is not None else self._store  # never opens the database to report on it
        by_status: dict[str, int] | None = None
        payload_bytes: int | None = None
        store_error: str | None = None
        if store is not None and not store.closed:
            try:
                store_stats = store.stats()
                by_status, payload_bytes = store_stats["by_status"], store_stats["payload_bytes"]
            except QuarantineStoreError as exc:
                store_error = str(exc)
        limits = store.limits if store is not None else dict(self._store_limits)
        with self._lock:
            return {
                "path": self._path,
                "records_by_status": by_status,
                "payload_bytes": payload_bytes,
                "store_error": store_error,
                "quarantined_by_trigger": dict(self._quarantined),
                "store_errors": self._store_errors,
                "orphans_discarded": self._orphans_discarded,
                "writer": None if writer is None else {
                    "running": writer.running, "written": writer.written, "failed": writer.failed,
                    "queued": writer.queued},
                "held_operations": sorted(self._held),
                "releases_in_flight": len(self._releasing),
                "tracked_operations": len(self._footprints),
                "poison_fingerprints": len(self._failures),
                "config": {
                    "spike_factor": self.spike_factor,
                    "spike_min_samples": self.spike_min_samples,
                    "spike_min_bytes": self.spike_min_bytes,
                    "spike_window": self.spike_window,
                    "spike_baseline_half_life": self.spike_baseline_half_life,
                    "write_timeout": self.write_timeout,
                    "queue_size": self.queue_size,
                    **limits,
                    "poison_failures": self.poison_failures,
                    "poison_capacity": self.poison_capacity,
                    "poison_ignore": [t.__qualname__ for t in self.poison_ignore],
                },
            }


def _digest(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    # A real digest, not hash(): hash(-1) == hash(-2) in CPython, so tuples of them collide.
    # Only the digest is kept: remembering the key itself would keep argument objects alive.
    try:
        return digest(repr(routing_key(op, args, kwargs, HashPolicy.STANDARD)), DigestPolicy.FAST)
    except Exception:  # a __repr__ that raises: this call is simply not tracked
        return None


def _check_int(name: str, value: object, low: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(f"{name} must be an integer >= {low}{hint}, got {value!r}")


#: How many operation types may be on hold at once (see QuarantinePolicy.hold).
MAX_HELD_OPERATIONS = 4096


def _check_op(operation_type: object) -> None:
    if not isinstance(operation_type, str) or not operation_type:
        raise ConfigurationError(f"operation_type must be a non-empty string, got {operation_type!r}")
