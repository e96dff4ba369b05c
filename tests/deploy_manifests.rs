//! Deployment files: every Azure ML YAML under `deploy/azureml` (CPU and GPU variants) loads with the official
//! `azure-ai-ml` SDK's offline loaders, every Kubernetes manifest under `deploy/kubernetes/base` and every object the
//! GPU overlay (`deploy/kubernetes/gpu`) renders to validates against the Kubernetes schemas (`kubernetes-validate`,
//! strict) or, for the KEDA and prometheus-operator resources, against the part of their CRD schemas the manifests
//! use; the values they share with amlserve agree, the probes hit the right paths, the GPU variants run only on GPUs
//! the CUDA image supports with `AMLSERVE_DEVICE=cuda`, and no release identity is written into a file; `deploy.sh`
//! runs against a stand-in `az` (`tests/python/deploy_manifests.py`), and so does `autoscale.sh`. The metrics the
//! scaling setup reads must exist in a real server's `/metrics`, and those the Azure ML rules read from Application
//! Insights must be gauges amlserve exports there.
//! The packages come from `.venv` (made by `make test-deps`), or `AMLSERVE_TEST_PYTHON` names the interpreter.

mod common;

use amlserve::app_insights::{Kind, EXPORTED};
use common::Server;

#[tokio::test(flavor = "multi_thread")]
async fn azureml_and_kubernetes_manifests_validate() {
    let root = env!("CARGO_MANIFEST_DIR");
    let stdout = common::run_python("deploy_manifests.py", &[root], "deploy manifest checks passed").await;
    let deploy = std::path::Path::new(root).join("deploy");
    // Every YAML file, in every folder below deploy/azureml and deploy/kubernetes, must have been checked; every
    // Kubernetes folder but the base is an overlay, which must have been rendered.
    let mut dirs = vec!["azureml".to_string(), "kubernetes".to_string()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(deploy.join(&dir)).expect("deploy folder") {
            let entry = entry.expect("entry");
            let name = entry.file_name().into_string().expect("UTF-8 name");
            if entry.file_type().expect("file type").is_dir() {
                let sub = format!("{dir}/{name}");
                if dir == "kubernetes" && name != "base" {
                    assert!(
                        stdout.contains(&format!("ok  deploy/{sub}: overlay rendered")),
                        "overlay {sub} was not rendered:\n{stdout}"
                    );
                }
                dirs.push(sub);
                continue;
            }
            if name == "kustomization.yaml" {
                continue; // read for its resources and patches, not validated as an object
            }
            if name.ends_with(".yml") || name.ends_with(".yaml") {
                assert!(
                    stdout.contains(&format!("ok  deploy/{dir}/{name}")),
                    "{dir}/{name} was not checked:\n{stdout}"
                );
            }
        }
    }
    assert!(
        stdout.contains("ok  deploy/azureml/deploy.sh: image, create and release of both variants"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok  deploy/azureml/autoscale.sh: per-slot rules"),
        "{stdout}"
    );

    // The autoscaler reads these series: each must be one the server exports.
    let scaling: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("scaling metric: "))
        .collect();
    assert!(
        scaling.contains(&"amlserve_num_requests_waiting") && scaling.contains(&"amlserve_kv_cache_usage_perc"),
        "{stdout}"
    );
    // The Azure ML rules on Application Insights read these: each must be one amlserve exports there, as a gauge.
    let exported: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("exported metric: "))
        .collect();
    assert!(exported.contains(&"amlserve_num_requests_waiting"), "{stdout}");
    for name in &exported {
        assert!(
            EXPORTED.contains(&(*name, Kind::Gauge)),
            "{name} is not a gauge amlserve exports to Application Insights: {EXPORTED:?}"
        );
    }
    let s = Server::start(&[]).await;
    let scrape = s.metrics().await;
    for name in scaling.into_iter().chain(exported) {
        assert!(
            scrape.contains(&format!("# TYPE {name} gauge")),
            "{name} is not a gauge in /metrics:\n{scrape}"
        );
    }
}
