"""The HTTP client of a Defuse coordinator (its `--http-listen` address): the job API
described at `/api/openapi.json`. Standard library only."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from . import _toml

#: States after which a job does not move on by itself.
FINAL = ("done", "failed", "cancelled")


class DefuseError(Exception):
    """The coordinator refused a request (`status` is the HTTP status) or could not be
    reached (`status` is None). The message is the coordinator's."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class JobFailed(DefuseError):
    """A job that was waited for ended failed or cancelled (`job` holds its status)."""

    def __init__(self, job: Dict[str, Any]):
        what = "was cancelled" if job["state"] == "cancelled" else f"failed: {job['error']}"
        super().__init__(f"job {job['id']} {what}")
        self.job = job


ConfigLike = Union[str, os.PathLike, Mapping[str, Any]]


# the fields of a job file that are paths (`s3://` URLs and absolute paths stay)
_PATH_FIELDS = [("data", "path"), ("models", "classifier"), ("models", "vae"),
                ("models", "vae_decoder"), ("label", "file"), (None, "out")]


def _job_file_text(path: Path) -> str:
    """A job file as TOML text with its relative paths taken from the file's folder, as
    `defuse run` and `defuse submit` read them (still relative when the folder is given
    relative: the coordinator reads them from its working directory). Python < 3.11 has
    no TOML reader: there the file is sent as it is."""
    text = path.read_text()
    try:
        import tomllib
    except ImportError:  # pragma: no cover
        return text
    cfg = tomllib.loads(text)
    base = path.parent
    for table, key in _PATH_FIELDS:
        at = cfg if table is None else cfg.get(table)
        if isinstance(at, dict) and isinstance(at.get(key), str):
            p = at[key]
            if not p.startswith("s3://") and not os.path.isabs(p):
                at[key] = os.path.normpath(os.path.join(base, p))
    return _toml.dumps(cfg)


def _config_text(config: ConfigLike) -> str:
    """A job config as TOML text: a dict, a path to a TOML file (its relative paths taken
    from its folder), or TOML text itself."""
    if isinstance(config, Mapping):
        return _toml.dumps(config)
    if isinstance(config, os.PathLike):
        return _job_file_text(Path(config))
    text = str(config)
    if "\n" not in text and text.endswith(".toml"):
        return _job_file_text(Path(text))
    return text


class Client:
    """A coordinator's job API. `url` is its HTTP address (`http://host:8080`);
    `token` its bearer token, if it has one (default: `DEFUSE_TOKEN`)."""

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get("DEFUSE_TOKEN")
        self.timeout = timeout

    # ---- the wire ----

    def _request(self, method: str, path: str, body: Any = None) -> bytes:
        return self._exchange(method, path, body)[0]

    def _exchange(self, method: str, path: str, body: Any = None) -> "tuple[bytes, Any]":
        """The reply's body and headers."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read(), r.headers
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace").strip() or e.reason
            raise DefuseError(f"{method} {path}: {message}", e.code) from None
        except urllib.error.URLError as e:
            raise DefuseError(f"cannot reach the coordinator at {self.url}: {e.reason}") from None

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        return json.loads(self._request(method, path, body))

    # ---- jobs ----

    def submit(self, config: ConfigLike, job_id: Optional[str] = None) -> "Job":
        """Submits a job: a dict (written as TOML), a path to a job file, or its TOML
        text. Paths in it are the coordinator's (a job file's relative ones are taken
        from its folder first)."""
        body: Dict[str, Any] = {"config": _config_text(config)}
        if job_id:
            body["job_id"] = job_id
        return Job(self, self._json("POST", "/api/jobs", body)["id"])

    def job(self, job_id: str) -> "Job":
        return Job(self, job_id)

    def jobs(self) -> List[Dict[str, Any]]:
        """Every job the coordinator keeps (all pages)."""
        out: List[Dict[str, Any]] = []
        after = ""
        while True:
            q = urllib.parse.urlencode({"after": after, "limit": 1000})
            raw, headers = self._exchange("GET", f"/api/jobs?{q}")
            out.extend(json.loads(raw))
            after = headers.get("X-Next-After") or ""
            if not after:
                return out


class Job:
    """A job on a coordinator."""

    def __init__(self, client: Client, job_id: str):
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def _path(self, rest: str = "") -> str:
        return f"/api/jobs/{urllib.parse.quote(self.id, safe='')}{rest}"

    def status(self) -> Dict[str, Any]:
        """The job as `GET /api/jobs/{id}` gives it: state, step, steps with shard
        counts, error, and the summary once done."""
        return self.client._json("GET", self._path())

    def wait(self, timeout: Optional[float] = None, poll: float = 1.0) -> Dict[str, Any]:
        """Waits until the job is done or waits for labels (not given yet), and returns
        its status. Raises JobFailed if it failed or was cancelled, TimeoutError after
        `timeout` seconds."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                st = self.status()
            except DefuseError as e:
                # a coordinator restarting (a rollout, a new leader) is waited out
                if e.status not in (None, 502, 503, 504):
                    raise
                if end is not None and time.monotonic() > end:
                    raise
                time.sleep(poll)
                continue
            if st["state"] in ("failed", "cancelled"):
                raise JobFailed(st)
            if st["state"] == "done" or (st["state"] == "awaiting_labels" and not st.get("labelled")):
                return st
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"job {self.id} is still {st['state']} ({st['step']})")
            time.sleep(poll)

    def label(self, labels: Mapping[Any, Union[int, str]]) -> Dict[str, int]:
        """Labels a job waiting for labels: scenario id -> class id, class name or
        "discard". Final; scenarios left out are discarded."""
        body = {str(k): v for k, v in labels.items()}
        return self.client._json("POST", self._path("/labels"), body)

    def cancel(self) -> str:
        """Cancels the job; returns its state."""
        return self.client._json("POST", self._path("/cancel"))["state"]

    def delete(self) -> int:
        """Deletes a finished job (state and artifacts); returns the objects removed."""
        return self.client._json("DELETE", self._path())["objects"]

    def results(self) -> List[str]:
        """The names of the results the job has now."""
        return self.client._json("GET", self._path("/results"))["results"]

    def result(self, name: str) -> bytes:
        return self.client._request("GET", self._path("/results/" + urllib.parse.quote(name)))

    def download(self, directory: Union[str, os.PathLike]) -> Path:
        """Writes every result into `directory`, in the layout of `defuse run`'s output
        folder (so `defuse.load(directory)` reads it); returns the folder."""
        root = Path(directory)
        for name in self.results():
            target = root / name
            if root.resolve() not in target.resolve().parents:
                raise DefuseError(f"result name {name!r} leaves {root}")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            tmp.write_bytes(self.result(name))
            tmp.replace(target)
        return root
