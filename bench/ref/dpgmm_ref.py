"""scikit-learn side of the DP-GMM comparison (bench/run.py).

    dpgmm_ref.py make X.npy N D SEED     a mixture of 12 overlapping Gaussians
    dpgmm_ref.py fit X.npy K SEED THREADS LABELS.json [MAX_ITER]
    dpgmm_ref.py ari A.json B.json       adjusted Rand index of two labelings

`fit` uses the settings of Defuse's DP-GMM (and the authors' `BayesianGaussianMixture`):
full covariances, Dirichlet-process weight prior 1/K, k-means initialisation, tol 1e-3,
max_iter 1000.
"""
import json
import sys
import time

import numpy as np


def make(path, n, d, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(12, d))
    sizes = rng.dirichlet(np.ones(12) * 2)
    comp = rng.choice(12, size=n, p=sizes)
    scales = rng.uniform(0.5, 1.5, size=(12, d))
    x = centres[comp] + rng.normal(size=(n, d)) * scales[comp]
    np.save(path, x.astype(np.float32))
    print(json.dumps({"made": path, "n": n, "d": d}))


def fit(path, k, seed, threads, labels_out, max_iter=1000):
    from sklearn.mixture import BayesianGaussianMixture
    from threadpoolctl import threadpool_limits

    x = np.load(path).astype(np.float64)
    with threadpool_limits(threads):
        t = time.perf_counter()
        m = BayesianGaussianMixture(
            n_components=k,
            covariance_type="full",
            weight_concentration_prior_type="dirichlet_process",
            max_iter=max_iter,
            tol=1e-3,
            random_state=seed,
        ).fit(x)
        dt = time.perf_counter() - t
        labels = m.predict(x)
        score = float(m.score(x))
    json.dump(labels.tolist(), open(labels_out, "w"))
    print(json.dumps({"impl": "sklearn", "n": len(x), "d": x.shape[1], "k": k, "seconds": dt,
                      "n_iter": int(m.n_iter_), "converged": bool(m.converged_),
                      "mean_log_likelihood": score, "lower_bound": float(m.lower_bound_),
                      "components_over_1pct": int((m.weights_ > 0.01).sum())}))


def ari(a, b):
    from sklearn.metrics import adjusted_rand_score

    print(json.dumps({"ari": adjusted_rand_score(json.load(open(a)), json.load(open(b)))}))


if __name__ == "__main__":
    c, r = sys.argv[1], sys.argv[2:]
    if c == "make":
        make(r[0], int(r[1]), int(r[2]), int(r[3]))
    elif c == "fit":
        fit(r[0], int(r[1]), int(r[2]), int(r[3]), r[4], int(r[5]) if len(r) > 5 else 1000)
    elif c == "ari":
        ari(r[0], r[1])
    else:
        sys.exit(f"unknown command {c}")
