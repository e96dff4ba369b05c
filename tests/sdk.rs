//! Real clients: the official `openai` and `azure-ai-inference` Python SDKs against the running server, with
//! and without an API key, and `openapi-spec-validator` on `/swagger.json`.

mod common;

use common::{run_python, Server};

#[tokio::test(flavor = "multi_thread")]
async fn openai_python_sdk_works_against_the_server() {
    let s = Server::start(&[]).await;
    run_python("openai_sdk.py", &[&s.base], "openai SDK checks passed").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_ai_inference_sdk_works_without_and_with_a_key() {
    let s = Server::start(&[]).await;
    run_python(
        "azure_inference_sdk.py",
        &[&s.base],
        "azure-ai-inference SDK checks passed",
    )
    .await;
    let s = Server::start(&["--api-key", "s3cret-key"]).await;
    run_python(
        "azure_inference_sdk.py",
        &[&s.base, "s3cret-key"],
        "azure-ai-inference SDK checks passed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn swagger_json_is_a_valid_openapi_document() {
    let s = Server::start(&[]).await;
    run_python("openapi_check.py", &[&s.base], "openapi document valid").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn structured_outputs_and_tool_calls_validate_through_the_sdks() {
    let s = Server::start(&[]).await;
    run_python("output_control.py", &[&s.base], "output control checks passed").await;
}
