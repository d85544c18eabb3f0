"""Reference fit with scikit-learn for the DP-GMM parity test.

usage: sklearn_ref.py X.npy K SEED  -> JSON on stdout
"""
import json
import sys

import numpy as np
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.mixture import BayesianGaussianMixture

x = np.load(sys.argv[1])
k = int(sys.argv[2])
seed = int(sys.argv[3])
m = BayesianGaussianMixture(
    n_components=k,
    covariance_type="full",
    weight_concentration_prior_type="dirichlet_process",
    max_iter=1000,
    random_state=seed,
).fit(x)
logp = np.stack(
    [np.log(max(w, 1e-300)) + multivariate_normal(mu, c).logpdf(x) for w, mu, c in zip(m.weights_, m.means_, m.covariances_)],
    axis=1,
)
print(json.dumps({
    "weights": m.weights_.tolist(),
    "labels": m.predict(x).tolist(),
    "mean_log_likelihood": float(logsumexp(logp, axis=1).mean()),
    "lower_bound": float(m.lower_bound_),
    "n_iter": int(m.n_iter_),
}))
