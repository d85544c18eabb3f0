"""deploy/gpu-check.sh's comparison: the failures of the device run (the whole job,
and identify alone in float32 and bfloat16), of the CPU run and of the distributed
run, and the figures, printed and written to OUT/gpu-check.json. Needs only torch
(it reads safetensors itself).

    gpu-check-compare.py WORK OUT DEVICE GPU_NAME S1 E1 S3 E3 T0
"""
import json, os, struct, sys, time
import torch

work, out, device, gpu_name = sys.argv[1:5]
s1, e1, s3, e3, t0 = map(float, sys.argv[5:10])

def tensors(path):
    """A safetensors file's tensors (torch only: no safetensors package needed)."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8:8 + n])
    kinds = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}
    res = {}
    for k, v in head.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        buf = bytearray(raw[8 + n + a:8 + n + b])
        t = torch.frombuffer(buf, dtype=kinds[v["dtype"]]) if b > a else torch.empty(0, dtype=kinds[v["dtype"]])
        res[k] = t.reshape(v["shape"])
    return res

def failures(run):
    return tensors(os.path.join(work, run, "identify/failures.safetensors"))

def summary(run):
    return json.load(open(os.path.join(work, run, "report/summary.json")))

def searched(run):
    """identify's figures of a run folder: its stats and its seconds (also for a run
    that stopped at labelling, which has no summary)."""
    st = json.load(open(os.path.join(work, run, "identify/failures.json")))
    st["seconds"] = json.load(open(os.path.join(work, run, "identify/done.json")))["seconds"]
    return st

def rows(f):
    """(image, rank within the image) -> row: the failures kept per image, in order."""
    seen, out = {}, {}
    for r, i in enumerate(f["source_index"].tolist()):
        k = seen.get(i, 0)
        seen[i] = k + 1
        out[(i, k)] = r
    return out

dev, cpu, dist, bf = failures("dev"), failures("cpu"), failures("dist"), failures("bfloat16")
sd, sdist = summary("dev"), summary("dist")
idev, icpu, ibf = searched("float32"), searched("cpu"), searched("bfloat16")
img_dev, img_cpu = set(dev["source_index"].tolist()), set(cpu["source_index"].tolist())
rd, rc = rows(dev), rows(cpu)
both = sorted(set(rd) & set(rc))
same_pred = sum(int(dev["predicted"][rd[k]] == cpu["predicted"][rc[k]]) for k in both)
dcode = max((float((dev["codes"][rd[k]] - cpu["codes"][rc[k]]).abs().max()) for k in both), default=0.0)
def same_draw(a, b):
    key = lambda f: set(zip(f["source_index"].tolist(), f["eps_norm"].view(torch.int32).tolist()))
    return key(a) & key(b)

def step(s, name):
    return dict(s["step_seconds"]).get(name)

def rate(st):
    return st["n_perturbations"] / st["seconds"] if st["seconds"] else None

marks = {}
if os.path.exists(os.path.join(out, "marks.txt")):
    for line in open(os.path.join(out, "marks.txt")):
        name, what, t = line.split()
        marks.setdefault(name, {})[what] = float(t)

def utilisation(window):
    """The GPU's utilisation and memory over a window (seconds since the epoch), from
    nvidia-smi's samples (local-time stamps)."""
    path = os.path.join(out, "gpu-util.csv")
    if device != "cuda" or not os.path.exists(path) or not window:
        return None
    vals = []
    for line in open(path):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        try:
            t = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S"))
        except ValueError:
            continue
        if window["start"] - 1 <= t <= window["end"]:
            vals.append((int(parts[1]), int(parts[2])))
    busy = [u for u, _ in vals]
    return {"samples": len(vals), "mean_util_pct": sum(busy) / len(busy) if busy else None,
            "max_util_pct": max(busy, default=None), "max_mem_mib": max((m for _, m in vals), default=None)}

res = {
    "device": device, "gpu": gpu_name, "torch": torch.__version__,
    "identify_images_searched": idev["n_searched"], "perturbations": idev["n_perturbations"],
    "identify_seconds_device": idev["seconds"], "identify_seconds_cpu": icpu["seconds"],
    "perturbations_per_s_device": rate(idev), "perturbations_per_s_cpu": rate(icpu),
    "cpu_threads": torch.get_num_threads(),
    "perturbations_per_s_device_bfloat16": rate(ibf),
    "failures_bfloat16": len(rows(bf)),
    # the same failure: the same image and the same draw (its ||eps|| to the bit)
    "failures_bfloat16_also_float32": len(same_draw(bf, dev)),
    "failures_device": len(rd), "failures_cpu": len(rc),
    "images_flagged_device": len(img_dev), "images_flagged_cpu": len(img_cpu),
    "images_flagged_both": len(img_dev & img_cpu),
    "failures_in_both": len(both), "same_prediction_in_both": same_pred,
    "max_code_difference": dcode,
    "images_searched_device_vs_cpu": [idev["n_searched"], icpu["n_searched"]],
    "distributed_failures_equal_embedded": bool(dev["source_index"].equal(dist["source_index"])),
    "distributed_max_code_difference": (float((dev["codes"] - dist["codes"]).abs().max())
                                        if dev["codes"].shape == dist["codes"].shape and dev["codes"].numel() else None),
    "test_accuracy_before_after_embedded": [sd["test_accuracy_before"], sd["test_accuracy_after"]],
    "test_accuracy_before_after_distributed": [sdist["test_accuracy_before"], sdist["test_accuracy_after"]],
    "correct_seconds_embedded": step(sd, "correct"), "distributed_job_seconds": e3 - s3,
    "embedded_run_seconds": e1 - s1, "step_seconds_embedded": sd["step_seconds"],
    "gpu_utilisation_identify_float32": utilisation(marks.get("float32")),
    "gpu_utilisation_identify_bfloat16": utilisation(marks.get("bfloat16")), "check_seconds": time.time() - t0,
}
json.dump(res, open(os.path.join(out, "gpu-check.json"), "w"), indent=2)
for k, v in res.items():
    print(f"{k:40} {v}")
ok = res["distributed_failures_equal_embedded"] and len(both) > 0
sys.exit(0 if ok else 1)
