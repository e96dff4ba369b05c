//! Deployment files: every Azure ML YAML under `deploy/azureml` loads with the official `azure-ai-ml` SDK's offline
//! loaders, every Kubernetes manifest under `deploy/kubernetes` validates against the Kubernetes schemas
//! (`kubernetes-validate`, strict) or, for the KEDA and prometheus-operator resources, against the part of their
//! CRD schemas the manifests use; the values they share with amlserve agree, the probes hit the right paths, and no
//! release identity is written into a file (`tests/python/deploy_manifests.py`). The metrics the scaling setup
//! reads must exist in a real server's `/metrics`.
//! The packages come from `.venv` (made by `make test-deps`), or `AMLSERVE_TEST_PYTHON` names the interpreter.

mod common;

use common::Server;

#[tokio::test(flavor = "multi_thread")]
async fn azureml_and_kubernetes_manifests_validate() {
    let root = env!("CARGO_MANIFEST_DIR");
    let stdout = common::run_python("deploy_manifests.py", &[root], "deploy manifest checks passed").await;
    let deploy = std::path::Path::new(root).join("deploy");
    for dir in ["azureml", "kubernetes"] {
        for entry in std::fs::read_dir(deploy.join(dir)).expect("deploy folder") {
            let name = entry.expect("entry").file_name().into_string().expect("UTF-8 name");
            if name == "kustomization.yaml" {
                continue; // read for its resource list, not validated as an object
            }
            if name.ends_with(".yml") || name.ends_with(".yaml") {
                assert!(
                    stdout.contains(&format!("ok  deploy/{dir}/{name}")),
                    "{name} was not checked:\n{stdout}"
                );
            }
        }
    }

    // The autoscaler reads these series: each must be one the server exports.
    let scaling: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("scaling metric: "))
        .collect();
    assert!(
        scaling.contains(&"amlserve_num_requests_waiting") && scaling.contains(&"amlserve_kv_cache_usage_perc"),
        "{stdout}"
    );
    let s = Server::start(&[]).await;
    let scrape = s.metrics().await;
    for name in scaling {
        assert!(
            scrape.contains(&format!("# TYPE {name} gauge")),
            "{name} is not a gauge in /metrics:\n{scrape}"
        );
    }
}
