//! What a platform relies on over an instance's life, against the real server: the engine watchdog turns
//! liveness to failing when the engine wedges (`--debug-wedge-engine-after-secs`, test-only), the drain delay
//! keeps serving new requests after SIGTERM while readiness already fails, and `--max-tokens-limit` caps every
//! route's token field with a 400 naming it.

mod common;

use std::time::{Duration, Instant};

use common::{assert_stream_ran_to_length, chat, sample, Server};
use futures::StreamExt;
use serde_json::{json, Value};

async fn status(s: &Server, path: &str) -> u16 {
    s.client
        .get(s.url(path))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("probe answered")
        .status()
        .as_u16()
}

/// `--engine-stall-secs 2`: sampled every 0.5 s, so liveness must fail within 2.5 s of the wedge; allow 2 s
/// more for a loaded machine.
const STALL_SECS: u64 = 2;
const STALL_BOUND: Duration = Duration::from_millis(4500);

#[tokio::test(flavor = "multi_thread")]
async fn a_wedged_engine_fails_liveness_within_the_stall_time() {
    let stall = STALL_SECS.to_string();
    let s = Server::start(&["--engine-stall-secs", &stall, "--debug-wedge-engine-after-secs", "0"]).await;
    // Idle is not stalled, however long: no work, no step expected.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(status(&s, "/").await, 200, "an idle engine is live");
    assert_eq!(sample(&s.metrics().await, "amlserve_engine_stalled"), 0.0);

    // The request's first step never returns.
    let client = s.client.clone();
    let url = s.url("/v1/chat/completions");
    let wedged = tokio::spawn(async move { client.post(url).json(&chat("hi", 8)).send().await });
    let sent = Instant::now();
    let failed_after = loop {
        if status(&s, "/").await == 503 {
            break sent.elapsed();
        }
        assert!(
            sent.elapsed() < STALL_BOUND,
            "liveness still 200 {:?} after the wedge",
            sent.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("liveness failed {failed_after:?} after the wedged request (--engine-stall-secs {STALL_SECS})");
    assert!(
        failed_after >= Duration::from_secs(STALL_SECS),
        "not before the stall time: {failed_after:?}"
    );
    let body: Value = s.client.get(s.url("/")).send().await.unwrap().json().await.unwrap();
    let why = body["message"].as_str().expect("a reason");
    assert!(
        why.contains("made no progress") && why.contains("--engine-stall-secs 2"),
        "{body}"
    );
    assert_eq!(status(&s, "/health").await, 503, "not ready either");
    assert_eq!(sample(&s.metrics().await, "amlserve_engine_stalled"), 1.0);
    assert!(
        s.drain_log().iter().any(|l| l.contains("made no progress")),
        "an error line says why liveness fails"
    );
    assert!(!wedged.is_finished(), "the wedged request is still waiting");
    wedged.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_delay_serves_new_requests_while_readiness_fails_then_refuses() {
    // Generous times: the test must hold on a loaded 2-core machine with other servers running beside it.
    let delay = Duration::from_secs(10);
    let mut s = Server::start(&["--drain-delay-secs", "10", "--shutdown-grace-secs", "120"]).await;
    // A stream in flight at SIGTERM: it must finish with every token.
    let body = json!({"prompt": "Count:", "max_tokens": 120, "ignore_eos": true, "stream": true, "temperature": 0});
    let mut stream = Box::pin(s.post_stream("/v1/completions", &body).await);
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    s.sigterm();
    let term = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(&s, "/health").await, 503, "readiness fails at once");
    eprintln!("drain: readiness checked {:?} after SIGTERM", term.elapsed());
    assert_eq!(
        status(&s, "/").await,
        200,
        "liveness stays: draining is not a reason to restart"
    );
    // New requests during the delay are served, on new connections too.
    let fresh = reqwest::Client::new();
    let r = fresh
        .post(s.url("/v1/chat/completions"))
        .json(&chat("Say hi", 4))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "served during the drain delay");
    let during = term.elapsed();
    eprintln!("drain: a new request answered {during:?} after SIGTERM");
    assert!(
        during < delay,
        "checked within the delay ({during:?}); the machine is too slow for this test"
    );
    tokio::time::sleep((delay + Duration::from_millis(500)).saturating_sub(term.elapsed())).await;
    // Refused after the delay: a 503 while the stream still runs, or no listener once it has finished and the
    // server has exited (a fast machine finishes the stream inside the delay).
    match fresh
        .post(s.url("/v1/chat/completions"))
        .json(&chat("hi", 2))
        .send()
        .await
    {
        Ok(r) => {
            assert_eq!(r.status(), 503, "refused after the drain delay");
            let v: serde_json::Value = r.json().await.unwrap();
            assert!(v["error"]["message"].as_str().unwrap().contains("shutting down"), "{v}");
        }
        Err(e) => assert!(e.is_connect(), "after the drain delay: {e}"),
    }
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert_stream_ran_to_length(&text, "the stream completed");
    assert_eq!(s.wait_exit(Duration::from_secs(60)), Some(0));
    eprintln!("exited {:?} after SIGTERM (drain delay {delay:?})", term.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn max_tokens_limit_refuses_more_and_caps_the_default() {
    let s = Server::start(&["--max-tokens-limit", "8", "--default-max-tokens", "100"]).await;
    let info = s.get_json("/info").await;
    assert_eq!(info["generation_defaults"]["max_tokens_limit"], 8, "{info}");
    assert_eq!(
        info["generation_defaults"]["max_tokens"], 8,
        "the default is lowered to the limit: {info}"
    );
    let models = s.get_json("/v1/models").await;
    assert_eq!(models["data"][0]["generation_defaults"]["max_tokens_limit"], 8);

    for (path, field) in [
        ("/v1/chat/completions", "max_tokens"),
        ("/v1/chat/completions", "max_completion_tokens"),
        ("/chat/completions", "max_tokens"),
    ] {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
        body[field] = json!(9);
        let (st, v) = s.post(path, body).await;
        assert_eq!(st, 400, "{path} {field}: {v}");
        assert_eq!(v["error"]["param"], field, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("at most 8") && msg.contains("--max-tokens-limit"), "{msg}");
    }
    let (st, v) = s
        .post("/v1/completions", json!({"prompt": "Once", "max_tokens": 9}))
        .await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = s
        .post(
            "/score",
            json!({"input_data": {"input_string": ["Once upon a time"], "parameters": {"max_new_tokens": 9}}}),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("max_new_tokens") && msg.contains("at most 8"), "{msg}");

    // At the limit is fine; leaving it out generates at most the limit.
    let (st, v) = s
        .post(
            "/v1/completions",
            json!({"prompt": "Once", "max_tokens": 8, "ignore_eos": true}),
        )
        .await;
    assert_eq!((st, v["usage"]["completion_tokens"].as_u64()), (200, Some(8)), "{v}");
    let (st, v) = s
        .post(
            "/v1/completions",
            json!({"prompt": "Once", "ignore_eos": true, "temperature": 0}),
        )
        .await;
    assert_eq!((st, v["usage"]["completion_tokens"].as_u64()), (200, Some(8)), "{v}");
}
