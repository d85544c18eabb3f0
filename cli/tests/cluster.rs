//! `defuse cluster` against scikit-learn's BayesianGaussianMixture on the same data.
use std::path::Path;
use std::process::Command;

use tch::{Kind, Tensor};

/// Adjusted Rand index of two labelings.
fn ari(a: &[i64], b: &[i64]) -> f64 {
    use std::collections::HashMap;
    let n = a.len() as f64;
    let c2 = |x: f64| x * (x - 1.0) / 2.0;
    let mut pairs: HashMap<(i64, i64), f64> = HashMap::new();
    let (mut ra, mut rb): (HashMap<i64, f64>, HashMap<i64, f64>) = Default::default();
    for (&x, &y) in a.iter().zip(b) {
        *pairs.entry((x, y)).or_default() += 1.0;
        *ra.entry(x).or_default() += 1.0;
        *rb.entry(y).or_default() += 1.0;
    }
    let index: f64 = pairs.values().map(|&v| c2(v)).sum();
    let (sa, sb): (f64, f64) = (
        ra.values().map(|&v| c2(v)).sum(),
        rb.values().map(|&v| c2(v)).sum(),
    );
    let expected = sa * sb / c2(n);
    (index - expected) / (0.5 * (sa + sb) - expected)
}

fn python() -> Command {
    let cache = std::env::var("DEFUSE_CACHE")
        .unwrap_or_else(|_| format!("{}/.cache/defuse", std::env::var("HOME").unwrap()));
    let mut c = Command::new("python3");
    c.env("PYTHONPATH", format!("{cache}/pytest-env"));
    c
}

#[test]
fn dpgmm_matches_scikit_learn_on_separated_clusters() {
    // 5 well-separated anisotropic clusters in 4-D, unequal sizes
    tch::manual_seed(7);
    let sizes = [400i64, 300, 200, 150, 100];
    let mut parts = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let centre =
            Tensor::randn([1, 4], (Kind::Double, tch::Device::Cpu)) * 12.0 + i as f64 * 3.0;
        let scale = Tensor::rand([1, 4], (Kind::Double, tch::Device::Cpu)) + 0.5;
        parts.push(Tensor::randn([n, 4], (Kind::Double, tch::Device::Cpu)) * scale + centre);
    }
    let x = Tensor::cat(&parts, 0);
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("x.npy");
    defuse_core::tensor_io::write_npy(&npy, &x).unwrap();

    let out = dir.path().join("fit.json");
    let st = Command::new(env!("CARGO_BIN_EXE_defuse"))
        .args([
            "cluster",
            npy.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-components",
            "20",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let ours: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sklearn_ref.py");
    let r = python()
        .args([script.to_str().unwrap(), npy.to_str().unwrap(), "20", "0"])
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "scikit-learn reference failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();

    let eff = |w: &serde_json::Value| {
        w.as_array()
            .unwrap()
            .iter()
            .filter(|v| v.as_f64().unwrap() > 0.01)
            .count()
    };
    assert_eq!(eff(&ours["weights"]), 5, "ours: {}", ours["weights"]);
    assert_eq!(
        eff(&theirs["weights"]),
        5,
        "scikit-learn: {}",
        theirs["weights"]
    );
    let labels = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    let a = ari(&labels(&ours["assignments"]), &labels(&theirs["labels"]));
    assert!(a >= 0.9, "adjusted Rand index {a}");
    let (lo, lt) = (
        ours["mean_log_likelihood"].as_f64().unwrap(),
        theirs["mean_log_likelihood"].as_f64().unwrap(),
    );
    assert!(
        (lo - lt).abs() < 0.005 * lt.abs().max(1.0),
        "mean log-likelihood ours {lo} vs scikit-learn {lt}"
    );
    eprintln!(
        "ours {lo} ({} iterations) vs scikit-learn {lt} ({} iterations), ARI {a}",
        ours["n_iter"], theirs["n_iter"]
    );
}
