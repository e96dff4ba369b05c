//! Deployment files: every Azure ML YAML under `deploy/azureml` loads with the official `azure-ai-ml` SDK's offline
//! loaders, every Kubernetes manifest under `deploy/kubernetes` validates against the Kubernetes schemas
//! (`kubernetes-validate`, strict), and the values they share with amlserve agree (`tests/python/deploy_manifests.py`).
//! The packages come from `.venv` (made by `make test-deps`), or `AMLSERVE_TEST_PYTHON` names the interpreter.

mod common;

#[tokio::test(flavor = "multi_thread")]
async fn azureml_and_kubernetes_manifests_validate() {
    let root = env!("CARGO_MANIFEST_DIR");
    let stdout = common::run_python("deploy_manifests.py", &[root], "deploy manifest checks passed").await;
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
