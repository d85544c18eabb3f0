"""Defuse from Python: submit jobs to a coordinator, follow and label them, and load
what they found into pandas.

    client = defuse.Client("http://coordinator:8080", token=...)
    job = client.submit("job.toml"); job.wait(); job.download("out")
    res = defuse.load("out"); res.failures.groupby("scenario").size()
"""

from .client import Client, DefuseError, Job, JobFailed
from .results import Results, load, read_safetensors

__all__ = ["Client", "DefuseError", "Job", "JobFailed", "Results", "load", "read_safetensors"]
__version__ = "0.1.0"
