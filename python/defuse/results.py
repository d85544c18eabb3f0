"""Defuse's results as pandas tables: the failures identify found, the scenarios distill
made of them, and the report's summary. Reads a `defuse run` output folder, or one
that `Job.download` filled (the same layout)."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import pandas as pd

FAILURES = "identify/failures.safetensors"
ASSIGNMENTS = "distill/assignments.json"
SCENARIOS = "distill/scenarios.json"
CLASSES = "classes.json"
LABELS = "labels.json"
SUMMARY = "report/summary.json"

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: Union[str, os.PathLike]) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """The tensors (numpy arrays) and the metadata of a safetensors file."""
    raw = Path(path).read_bytes()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than its header)")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{path}: not a safetensors file (header of {n} bytes past the end)")
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {}) or {}
    data = memoryview(raw)[8 + n :]
    out = {}
    for name, t in header.items():
        dtype = _DTYPES.get(t["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name}: dtype {t['dtype']} is not supported")
        b, e = t["data_offsets"]
        out[name] = np.frombuffer(data[b:e], dtype=np.dtype(dtype).newbyteorder("<")).reshape(t["shape"])
    return out, meta


@dataclass
class Results:
    """What a job found. `failures`: one row per failure (the source image's index in
    the searched split, its true label, the prediction on the perturbed image, the
    confidence, ||eps||, and the scenario it belongs to, or <NA>). `codes`: the
    failures' latent codes, row for row. `scenarios`: one row per failure scenario.
    `summary`: report/summary.json (None before the report). `labels`: the labels
    given (None before)."""

    failures: pd.DataFrame
    codes: np.ndarray
    scenarios: pd.DataFrame
    classes: list
    summary: Optional[Dict[str, Any]]
    labels: Optional[Dict[str, Any]]
    stats: Dict[str, Any]


def _job_of_url(url: str, token: Optional[str]) -> Any:
    """The `Job` a job URL names."""
    from urllib.parse import unquote, urlsplit

    from .client import Client

    u = urlsplit(url)
    head, sep, job_id = u.path.rstrip("/").rpartition("/api/jobs/")
    if u.scheme not in ("http", "https") or not sep or not job_id or "/" in job_id:
        raise ValueError(
            f"{url}: expected a job's URL at a coordinator, http(s)://host:port/api/jobs/<id>, "
            "or an output folder"
        )
    return Client(f"{u.scheme}://{u.netloc}{head}", token=token).job(unquote(job_id))


def _json(root: Path, rel: str) -> Optional[Any]:
    p = root / rel
    return json.loads(p.read_text()) if p.exists() else None


def load(source: Any, token: Optional[str] = None) -> Results:
    """Loads a job's results: from an output folder, from a `Job`, or from a job's URL at
    a coordinator, `http(s)://host:port/api/jobs/<id>` (with `token`, default
    `DEFUSE_TOKEN`). A job's results are downloaded to a temporary folder first."""
    if hasattr(source, "download") and hasattr(source, "results"):
        with tempfile.TemporaryDirectory(prefix="defuse-") as d:
            return load(source.download(d))
    if isinstance(source, str) and "://" in source:
        return load(_job_of_url(source, token))
    root = Path(source)
    path = root / FAILURES
    if not path.exists():
        raise FileNotFoundError(f"{path}: no failures yet (identify has not finished)")
    t, meta = read_safetensors(path)
    for k in ("codes", "source_index", "true_label", "predicted", "confidence", "eps_norm"):
        if k not in t:
            raise ValueError(f"{path}: tensor {k} is missing")
    failures = pd.DataFrame(
        {
            "source_index": t["source_index"].astype(np.int64),
            "true_label": t["true_label"].astype(np.int64),
            "predicted": t["predicted"].astype(np.int64),
            "confidence": t["confidence"].astype(np.float32),
            "eps_norm": t["eps_norm"].astype(np.float32),
        }
    )
    scenarios_list = _json(root, SCENARIOS) or []
    scenarios = pd.DataFrame(
        [
            {
                "id": s["id"],
                "component": s["component"],
                "weight": s["weight"],
                "size": s["size"],
                "predicted": s["predicted"],
                "source_labels": {int(k): v for k, v in s["source_labels"].items()},
            }
            for s in scenarios_list
        ],
        columns=["id", "component", "weight", "size", "predicted", "source_labels"],
    )
    # each failure's mixture component, as a scenario id (components below the weight
    # cutoff are no scenario)
    assignments = _json(root, ASSIGNMENTS)
    scenario = pd.array([pd.NA] * len(failures), dtype="Int64")
    if assignments is not None:
        if len(assignments) != len(failures):
            raise ValueError(
                f"{root / ASSIGNMENTS}: {len(assignments)} assignments for {len(failures)} failures"
            )
        by_component = {s["component"]: s["id"] for s in scenarios_list}
        scenario = pd.array([by_component.get(c, pd.NA) for c in assignments], dtype="Int64")
    failures["scenario"] = scenario
    stats = json.loads(meta["defuse.identify"]) if "defuse.identify" in meta else {}
    return Results(
        failures=failures,
        codes=np.asarray(t["codes"], dtype=np.float32),
        scenarios=scenarios,
        classes=_json(root, CLASSES) or [],
        summary=_json(root, SUMMARY),
        labels=_json(root, LABELS),
        stats=stats,
    )
