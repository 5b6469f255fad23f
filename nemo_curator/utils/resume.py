"""Resume after a crash: the one place that knows completion markers and fingerprints.

A shard's output is complete when its stats file (``NNNNN.stats.json``, written atomically and
LAST, after the shard's tar/parquet/idx) holds a ``resume`` record that matches the current job::

    "resume": {"version": 1,
               "job": "<sha256 of what produced it: operation, lineage, columns, layout parameters>",
               "inputs":  {"/abs/in/00003.tar": {"size": 123, "mtime_ns": 1700000000000000000}, ...},
               "outputs": {"/abs/out/00003.parquet": {"size": 456, "mtime_ns": ...}, ...}}

A rerun skips the shard when the job hash is equal, every output still has the recorded size and
modification time, and every input is unchanged (same size and mtime), or, for an input that is
also an output (``save_metadata()`` in place), is exactly the output this job wrote. Anything
else (another pipeline, a touched input, a missing or edited output) redoes the shard.
File identity is (size, mtime_ns): cheap (one ``stat`` per file) and enough for files that are
only ever replaced whole, as every file written here is.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any, Iterable, Mapping

MARKER_VERSION = 1
RESUME_KEY = "resume"


class LineageStep(str):
    """One operation in a dataset's lineage, typed: what it was (``operation``), what changes its
    output (``detail``) and, where it reads files whose content its settings do not pin (model
    weights), their identity (``identity``). Its text (``str(step)``: ``"<operation>:<detail>"``
    unless given) is what a person reads; ``key`` (the text plus the identity) is what the job
    fingerprints hold. A lineage is a tuple of steps.

    Operations of this package: ``source`` (the folder read), ``embed``, ``classify``, ``filter``,
    ``untracked`` (hand edits of the metadata: Dask's token of the edited collection); a plain
    string given as a step (a user's own ``map_shards``) becomes one of operation ``step``.
    """

    operation: str
    detail: str
    identity: str | None

    def __new__(cls, operation: str, detail: str, text: str | None = None, identity: str | None = None):
        step = super().__new__(cls, f"{operation}:{detail}" if text is None else text)
        step.operation, step.detail, step.identity = operation, detail, identity
        return step

    def __getnewargs__(self):
        return self.operation, self.detail, str(self), self.identity

    # Two steps are the same when their keys are: the same text with other weights is another step.
    def __eq__(self, other) -> bool:
        return self.key == (other.key if isinstance(other, LineageStep) else other)

    def __ne__(self, other) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self.key)

    # Dask tokenizes any str as its text: code that tokenizes a step tokenizes ``step.key``.


    @property
    def key(self) -> str:
        """The step as the job fingerprints hold it: its text, and the identity of what it read."""
        return str(self) if self.identity is None else f"{self}|identity={self.identity}"

    @classmethod
    def of(cls, step: "LineageStep | str") -> "LineageStep":
        """A step as it is, or a plain string as a step of operation ``step`` (its text unchanged)."""
        return step if isinstance(step, LineageStep) else cls("step", str(step), text=str(step))


def lineage_keys(lineage) -> list[str]:
    """A lineage as the job fingerprints hold it (``LineageStep.key`` of each step)."""
    return [LineageStep.of(step).key for step in lineage]


UNTRACKED = "untracked"  # the operation of the step that records hand edits


def unidentified_weights() -> str:
    """A weights identity that matches no other run: for weights that have none (random init),
    so that a rerun never resumes outputs that a different random model made."""
    return f"unidentified-{uuid.uuid4().hex}"


def fingerprint(obj: Any) -> str:
    """Hex sha256 of ``obj`` serialised as canonical JSON (sorted keys; tuples as lists)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_identity(path: str | os.PathLike) -> dict | None:
    """``{"size": bytes, "mtime_ns": int}`` of a file, or None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def identities(paths: Iterable[str]) -> dict[str, dict | None]:
    """``{path: file_identity(path)}`` for each path."""
    return {os.fspath(p): file_identity(p) for p in paths}


def make_record(job: str, inputs: Mapping[str, dict | None], outputs: Iterable[str]) -> dict:
    """The ``resume`` record for a shard whose ``outputs`` were just written (call it on the worker,
    after the outputs and before the stats file). ``inputs``: identities taken before the work."""
    return {"version": MARKER_VERSION, "job": job, "inputs": dict(inputs), "outputs": identities(outputs)}


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in ``path``, or None when it is absent or unreadable."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (FileNotFoundError, ValueError, OSError):
        return None
    return obj if isinstance(obj, dict) else None


def completed_stats(stats_path: str | os.PathLike, job: str, inputs: Mapping[str, dict | None]) -> dict | None:
    """The stored stats of a shard that this job already completed, or None when it must be (re)done.

    ``inputs``: the identities of the shard's inputs now (``identities(...)``).
    """
    stats = read_json(stats_path)
    record = (stats or {}).get(RESUME_KEY)
    if not isinstance(record, dict) or record.get("version") != MARKER_VERSION or record.get("job") != job:
        return None
    outputs = record.get("outputs") or {}
    if not outputs or any(file_identity(path) != ident for path, ident in outputs.items()):
        return None
    recorded_inputs = record.get("inputs") or {}
    for path, now in inputs.items():
        if now != recorded_inputs.get(path) and not (path in outputs and now == outputs[path]):
            return None
    return stats
