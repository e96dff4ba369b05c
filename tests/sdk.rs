//! Real clients: the official `openai` Python SDK against the running server (`tests/python/openai_sdk.py`).
//! The SDK comes from `.venv` (made by `make test-deps`), or `AMLSERVE_TEST_PYTHON` names the interpreter.

mod common;

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

#[tokio::test(flavor = "multi_thread")]
async fn openai_python_sdk_works_against_the_server() {
    let s = common::Server::start(&[]).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_sdk.py");
    let base = s.base.clone();
    let out = tokio::task::spawn_blocking(move || std::process::Command::new(python()).arg(script).arg(base).output())
        .await
        .expect("join")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "SDK checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("openai SDK checks passed"), "{stdout}");
}
