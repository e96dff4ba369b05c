//! Deployment files: every Azure ML YAML under `deploy/azureml` loads with the official `azure-ai-ml` SDK's offline
//! loaders, every Kubernetes manifest under `deploy/kubernetes` validates against the Kubernetes schemas
//! (`kubernetes-validate`, strict), and the values they share with amlserve agree (`tests/python/deploy_manifests.py`).
//! The packages come from `.venv` (made by `make test-deps`), or `AMLSERVE_TEST_PYTHON` names the interpreter.

use std::path::PathBuf;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("AMLSERVE_TEST_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.is_file(),
        "{} is missing: run `make test-deps` (or set AMLSERVE_TEST_PYTHON)",
        venv.display()
    );
    venv
}

#[test]
fn azureml_and_kubernetes_manifests_validate() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(python())
        .arg(root.join("tests/python/deploy_manifests.py"))
        .arg(&root)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "deploy manifest checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("deploy manifest checks passed"), "{stdout}");
    for file in [
        "endpoint.yml",
        "deployment.yml",
        "environment.yml",
        "model.yml",
        "deployment.yaml",
        "hpa.yaml",
    ] {
        assert!(stdout.contains(file), "{file} was not checked:\n{stdout}");
    }
}
