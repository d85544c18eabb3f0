"""The Python client against a real coordinator and worker (the `defuse` binary named
by DEFUSE_BIN), on real MNIST images and small models trained for the test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import defuse
from defuse import _toml

BIN = os.environ.get("DEFUSE_BIN", "")
REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "mnist"
TOKEN = "python-client-test-token-0123456789abcdef"
WORKER_TOKEN = "python-client-worker-token-0123456789abcdef"

pytestmark = pytest.mark.skipif(not BIN, reason="DEFUSE_BIN names no defuse binary")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 30) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}:\n{log.read_text()[-3000:]}")


def spawn(args, log: Path, env=None) -> subprocess.Popen:
    e = dict(os.environ, RUST_LOG="info", DEFUSE_TOKEN=TOKEN, DEFUSE_WORKER_TOKEN=WORKER_TOKEN)
    e.update(env or {})
    return subprocess.Popen([BIN, *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=e)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    clf, vae = d / "clf.safetensors", d / "vae.safetensors"
    common = ["--data", str(DATA), "--limit-train", "4000"]
    subprocess.run([BIN, "train", "classifier", *common, "--out", str(clf), "--epochs", "1", "--width", "8"],
                   check=True, capture_output=True)
    subprocess.run([BIN, "train", "vae", *common, "--out", str(vae), "--epochs", "2", "--latent", "6",
                    "--width", "16", "--hidden", "64"], check=True, capture_output=True)
    return clf, vae


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A coordinator (memory state, a local artifact folder, a token) and one worker."""
    d = tmp_path_factory.mktemp("cluster")
    grpc, http = free_port(), free_port()
    clog, wlog = d / "coordinator.log", d / "worker.log"
    coord = spawn(["coordinator", "--listen", f"127.0.0.1:{grpc}", "--http-listen", f"127.0.0.1:{http}",
                   "--artifacts", f"file://{d / 'artifacts'}", "--work-dir", str(d / "work"),
                   "--lease-ms", "3000", "--heartbeat-ms", "300",
                   # jobs read the repository's data and the models trained under pytest's temp folder
                   "--allow-path", str(DATA), "--allow-path", str(DATA.resolve()), "--allow-path", str(tmp_path_factory.getbasetemp())], clog)
    procs = [coord]
    try:
        wait_port(http, coord, clog)
        worker = spawn(["worker", "--coordinator", f"http://127.0.0.1:{grpc}", "--threads", "1",
                        "--cache-dir", str(d / "worker")], wlog)
        procs.append(worker)
        yield f"http://127.0.0.1:{http}", d
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def job_config(models, label_mode: str = "manual") -> dict:
    clf, vae = models
    return {
        "name": "python-client",
        "seed": 5,
        "data": {"path": DATA, "limit_train": 4000},
        "models": {"classifier": clf, "vae": vae},
        "identify": {"samples": 24, "keep": 2, "shard_size": 250, "limit": 1000,
                     "perturbation": {"kind": "gaussian", "sigma": 0.5}},
        "distill": {"max_components": 20},
        "label": {"mode": label_mode, "discard_non_failures": False},
        "correct": {"samples_per_scenario": 40},
    }


def test_submit_wait_label_download_and_load(cluster, models, tmp_path):
    url, _ = cluster
    client = defuse.Client(url, token=TOKEN)
    job = client.submit(job_config(models))
    assert job.id.startswith("python-client")
    st = job.wait(timeout=300)
    assert st["state"] == "awaiting_labels", st
    identify = next(s for s in st["steps"] if s["step"] == "identify")
    assert identify["shards"] == {"total": 4, "pending": 0, "leased": 0, "done": 4, "failed": 0}

    # what a person looks at before labelling: the scenarios, read over HTTP
    assert "distill/scenarios.json" in job.results()
    scenarios = json.loads(job.result("distill/scenarios.json"))
    assert scenarios, "no failure scenario to label"
    # label each scenario with its sources' most common class (what the oracle does)
    labels = {s["id"]: int(max(s["source_labels"].items(), key=lambda kv: kv[1])[0]) for s in scenarios}
    got = job.label(labels)
    assert got == {"labelled": len(labels), "discarded": 0}
    with pytest.raises(defuse.DefuseError) as e:
        job.label(labels)
    assert e.value.status == 409 and "labelled already" in str(e.value)

    st = job.wait(timeout=300)
    assert st["state"] == "done", st
    summary = st["summary"]
    assert summary["n_labelled"] == len(labels)

    out = job.download(tmp_path / "out")
    names = job.results()
    assert any(n.startswith("model/") for n in names), names
    for n in names:
        assert (out / n).is_file(), n
    res = defuse.load(out)
    assert res.summary == summary
    assert len(res.failures) == summary["n_failures"] > 0
    assert res.codes.shape == (len(res.failures), 6)
    assert list(res.failures.columns) == [
        "source_index", "true_label", "predicted", "confidence", "eps_norm", "scenario"]
    f = res.failures
    # a failure is a prediction that differs from the true label, of an image searched
    assert (f["predicted"] != f["true_label"]).all()
    assert f["source_index"].between(0, 999).all()
    assert (f["eps_norm"] > 0).all() and f["confidence"].between(0, 1).all()
    # the scenarios: ids as labelled, sizes that match the failures assigned to them
    assert sorted(res.scenarios["id"]) == sorted(labels)
    counted = f["scenario"].value_counts()
    for _, s in res.scenarios.iterrows():
        assert counted.get(s["id"], 0) == s["size"], s
        # the majority prediction of its failures is the scenario's
        assert f[f["scenario"] == s["id"]]["predicted"].mode()[0] == s["predicted"]
    # the flat table, as pandas reads it (pyarrow): the same failures, with class names
    table = pd.read_parquet(out / "distill" / "failures.parquet")
    assert len(table) == len(f)
    for c in ["source_index", "true_label", "predicted", "confidence", "eps_norm", "scenario"]:
        assert table[c].astype(f[c].dtype).equals(f[c]), c
    classes = json.loads((out / "classes.json").read_text())
    assert (table["true_class"] == [classes[i] for i in f["true_label"]]).all()
    assert (table["predicted_class"] == [classes[i] for i in f["predicted"]]).all()
    assert table["scenario"].isna().sum() == f["scenario"].isna().sum()
    assert res.labels == {str(k): v for k, v in labels.items()}
    assert res.stats["n_failures"] == summary["n_failures"]
    # straight from the job, too, and from its URL
    again = defuse.load(job)
    assert again.failures.equals(res.failures)
    by_url = defuse.load(f"{url}/api/jobs/{job.id}", token=TOKEN)
    assert by_url.failures.equals(res.failures) and by_url.summary == summary
    for bad in ["s3://bucket/out", f"{url}/api/jobs/", f"{url}/jobs/{job.id}"]:
        with pytest.raises(ValueError, match="expected a job's URL"):
            defuse.load(bad)


def test_refusals_cancel_and_delete(cluster, models):
    url, _ = cluster
    client = defuse.Client(url, token=TOKEN)
    bad = job_config(models)
    bad["identify"]["keep"] = 0
    with pytest.raises(defuse.DefuseError) as e:
        client.submit(bad)
    assert e.value.status == 400 and "identify.keep" in str(e.value)
    with pytest.raises(defuse.DefuseError) as e:
        defuse.Client(url, token="wrong-token-wrong-token-wrong-token").jobs()
    assert e.value.status == 401
    # the JSON API takes JSON only
    req = urllib.request.Request(url + "/api/jobs", data=b"name = 'x'", method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as h:
        urllib.request.urlopen(req)
    assert h.value.code == 415

    job = client.submit(job_config(models), job_id="to-cancel")
    assert job.id == "to-cancel"
    # the same job again under its id is the job already there (a retried submit);
    # another config under that id is refused
    assert client.submit(job_config(models), job_id="to-cancel").id == "to-cancel"
    other = job_config(models)
    other["identify"]["keep"] = 3
    with pytest.raises(defuse.DefuseError) as e:
        client.submit(other, job_id="to-cancel")
    assert e.value.status == 409 and "another config" in str(e.value)
    assert job.cancel() == "cancelled"
    with pytest.raises(defuse.JobFailed) as e:
        job.wait(timeout=30)
    assert e.value.job["state"] == "cancelled"
    # deleted once the coordinator has retired it (409 until then)
    end = time.monotonic() + 20
    while True:
        try:
            job.delete()
            break
        except defuse.DefuseError as err:
            assert err.status == 409 and time.monotonic() < end, err
            time.sleep(0.3)
    with pytest.raises(defuse.DefuseError) as e:
        job.status()
    assert e.value.status == 404
    assert "to-cancel" not in [j["id"] for j in client.jobs()]


def test_the_openapi_document_describes_what_is_served(cluster):
    url, _ = cluster
    with urllib.request.urlopen(url + "/api/openapi.json") as r:
        doc = json.load(r)
    assert doc["openapi"].startswith("3.1")
    required = doc["components"]["schemas"]["Job"]["required"]
    client = defuse.Client(url, token=TOKEN)
    jobs = client.jobs()
    assert jobs, "the other tests left a job"
    for j in jobs:
        assert set(required) <= set(j), j
    # every operation it documents is served: a routed handler answers (JSON errors for
    # a job that does not exist), never axum's bare 404/405 for an unknown route
    for path, ops in doc["paths"].items():
        concrete = path.replace("{id}", "no-such-job").replace("{name}", "report/summary.json")
        for method in ops:
            if method == "parameters":
                continue
            body = b"{}" if method in ("post", "put") else None
            req = urllib.request.Request(url + concrete, data=body, method=method.upper(),
                                         headers={"Authorization": f"Bearer {TOKEN}",
                                                  "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req) as r:
                    status, raw = r.status, r.read()
            except urllib.error.HTTPError as e:
                status, raw = e.code, e.read()
            assert status != 405, (method, path)
            if status == 404:
                assert "error" in json.loads(raw), (method, path, raw)


def test_job_dicts_are_written_as_toml_the_coordinator_reads():
    cfg = {"name": 'a "quoted" name', "seed": 3, "data": {"path": Path("/x y"), "limit_train": 10},
           "identify": {"perturbation": {"kind": "gaussian", "sigma": 0.5}, "ratio": 1e-3, "flag": True,
                        "list": [1, 2]}}
    back = tomllib.loads(_toml.dumps(cfg))
    assert back == {"name": 'a "quoted" name', "seed": 3, "data": {"path": "/x y", "limit_train": 10},
                    "identify": {"perturbation": {"kind": "gaussian", "sigma": 0.5}, "ratio": 1e-3,
                                 "flag": True, "list": [1, 2]}}
    with pytest.raises(TypeError):
        _toml.dumps({"x": object()})


def test_job_files_send_paths_from_their_folder(tmp_path):
    from defuse.client import _config_text
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    f = jobs / "job.toml"
    f.write_text('out = "../runs/x"\n[data]\npath = "../data/mnist"\n'
                 '[models]\nvae = "s3://bucket/vae.safetensors"\nclassifier = "/abs/c.pt"\n')
    back = tomllib.loads(_config_text(f))
    assert back["data"]["path"] == str(tmp_path / "data/mnist")
    assert back["out"] == str(tmp_path / "runs/x")
    assert back["models"] == {"vae": "s3://bucket/vae.safetensors", "classifier": "/abs/c.pt"}
    # a job file named from its own folder keeps relative paths relative
    rel = os.path.relpath(f)
    assert tomllib.loads(_config_text(rel))["data"]["path"] == os.path.normpath(
        os.path.join(os.path.dirname(rel), "../data/mnist"))
