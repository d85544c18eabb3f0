"""Why scenarios are discarded, from a finished job's report/summary.json.

    python3 bench/yield.py runs/mnist/report/summary.json [--min-purity 0.6]

Re-applies the source-majority oracle's two tests to every scenario (the majority
source label must cover `min_purity` of its failures; the classifier must get at most
half of its grid samples right) and prints, per outcome, how many scenarios, how many
failures they hold, and the classifier's accuracy on their real member images before
and after correction (`real_members`). The last line is the same as JSON.
"""
import argparse
import json
import sys


def outcome(s, min_purity):
    src = {int(k): v for k, v in s["source_labels"].items()}
    total = sum(src.values())
    if total == 0:
        return "impure"
    label = max(src, key=lambda k: (src[k], -k))
    if src[label] < min_purity * total:
        return "impure"
    preds = s["sample_predictions"]
    right = sum(p == label for p in preds)
    if preds and 2 * right >= len(preds):
        return "samples already right"
    return "labelled"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("summary")
    ap.add_argument("--min-purity", type=float, default=0.6)
    a = ap.parse_args()
    s = json.load(open(a.summary))
    groups = {}
    for sc in s["scenarios"]:
        g = groups.setdefault(outcome(sc, a.min_purity),
                              {"scenarios": 0, "failures": 0, "members": 0, "right_before": 0, "right_after": 0})
        g["scenarios"] += 1
        g["failures"] += sc["size"]
        m = sc.get("real_members") or {}
        g["members"] += m.get("images", 0)
        g["right_before"] += m.get("right_before", 0)
        g["right_after"] += m.get("right_after", 0)
    pct = lambda n, d: f"{100 * n / d:.1f}%" if d else "-"
    print("| outcome | scenarios | failures | real members | their accuracy before -> after |")
    print("|---|---:|---:|---:|---|")
    for k in ("labelled", "impure", "samples already right"):
        g = groups.get(k)
        if g:
            print(f"| {k} | {g['scenarios']} | {g['failures']:,} | {g['members']:,} | "
                  f"{pct(g['right_before'], g['members'])} -> {pct(g['right_after'], g['members'])} |")
    print(json.dumps(groups))


if __name__ == "__main__":
    sys.exit(main())
