//! The Helm chart (helm/defuse), the plain manifests (deploy/k8s) and the container files
//! (deploy/docker), checked offline by deploy/check-chart.py: lint and render with every
//! values file in helm/defuse/ci, strict validation against the Kubernetes schemas, the
//! broken values files refused, deploy/k8s equal to a fresh render. Needs what
//! deploy/setup-test.sh installs (helm-python-sdk and kubernetes-validate, in
//! ~/.cache/defuse/chart-env).
use std::path::Path;
use std::process::Command;

#[test]
fn helm_chart_renders_and_validates_offline() {
    let cache = std::env::var("DEFUSE_CACHE")
        .unwrap_or_else(|_| format!("{}/.cache/defuse", std::env::var("HOME").unwrap()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new("python3")
        .arg(root.join("deploy/check-chart.py"))
        .current_dir(root)
        .env("PYTHONPATH", format!("{cache}/chart-env"))
        .output()
        .expect("cannot start python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "deploy/check-chart.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!("{stdout}");
}
