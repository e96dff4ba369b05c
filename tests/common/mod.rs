//! Test harness: starts the real `amlserve` binary on 127.0.0.1 with port 0 and the real model, and stops it
//! when the guard drops. Each test gets its own server (the model loads in well under a second).
#![allow(dead_code)]

pub mod kernel_cases;
pub mod logits;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One string field (`id`, `model_type`...) of every entry `/v1/models` lists, in its order.
pub fn listed(models: &serde_json::Value, field: &str) -> Vec<String> {
    models["data"]
        .as_array()
        .expect("a data array")
        .iter()
        .filter_map(|m| m[field].as_str().map(str::to_string))
        .collect()
}

/// The default model, fetched by `make models` (or the file `AMLSERVE_TEST_MODEL` names, for test binaries
/// carried to another machine, as `scripts/gpu-check.sh` does).
pub fn model_path() -> PathBuf {
    let p = std::env::var_os("AMLSERVE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(p.is_file(), "{} is missing: run `make models` first", p.display());
    p
}

/// The embedding model folder, fetched by `make models`.
pub fn embedding_model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-minilm-l6-v2");
    assert!(
        p.join("config.json").is_file(),
        "{} is missing: run `make models` first",
        p.display()
    );
    p
}

/// The Gemma 3 270M GGUF, fetched by `make models-gemma` (or the file `AMLSERVE_TEST_GEMMA` names).
pub fn gemma_path() -> PathBuf {
    let p = std::env::var_os("AMLSERVE_TEST_GEMMA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/gemma3/gemma-3-270m-q4_k_m.gguf"));
    assert!(p.is_file(), "{} is missing: run `make models-gemma` first", p.display());
    p
}

/// A running server.
pub struct Server {
    child: Child,
    pub base: String,
    pub client: reqwest::Client,
    log: mpsc::Receiver<String>,
    /// The lines read before the address was printed (start-up), not yet drained.
    early: std::sync::Mutex<Vec<String>>,
}

impl Server {
    /// Starts the server with extra flags and waits until it is ready.
    pub async fn start(extra: &[&str]) -> Self {
        let s = Self::spawn(extra);
        s.wait_ready().await;
        s
    }

    /// Starts a server serving each `(name, path)` as `--model name=path` (the first is the default), with
    /// extra flags (e.g. `--embedding-model`), and waits until every model is ready.
    pub async fn start_models(models: &[(&str, &Path)], extra: &[&str]) -> Self {
        let specs: Vec<String> = models
            .iter()
            .map(|(name, path)| format!("{name}={}", path.display()))
            .collect();
        let mut args: Vec<&str> = specs.iter().flat_map(|m| ["--model", m.as_str()]).collect();
        args.extend_from_slice(extra);
        Self::start(&args).await
    }

    /// Starts the server with extra flags and environment variables and waits until it is ready.
    pub async fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let s = Self::spawn_with_env(extra, env);
        s.wait_ready().await;
        s
    }

    /// Starts the server without waiting for readiness (on 127.0.0.1 unless `extra` has `--host`).
    pub fn spawn(extra: &[&str]) -> Self {
        Self::spawn_with_env(extra, &[])
    }

    /// [`Self::spawn`] with environment variables set for the server.
    pub fn spawn_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_amlserve"));
        cmd.args(["--port", "0"]);
        if !extra.contains(&"--host") {
            cmd.args(["--host", "127.0.0.1"]);
        }
        if !extra.contains(&"--model") {
            cmd.arg("--model").arg(model_path());
        }
        let mut child = cmd
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start amlserve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut early = Vec::new();
        let addr = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("server printed its address");
            let addr = line
                .split("address=")
                .nth(1)
                .map(|rest| rest.split_whitespace().next().expect("address").to_string());
            early.push(line);
            if let Some(addr) = addr {
                break addr;
            }
        };
        Self {
            child,
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            log: rx,
            early: std::sync::Mutex::new(early),
        }
    }

    /// Polls `/health` until it answers 200.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(r) = self.client.get(self.url("/health")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server did not become ready");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON and returns status and parsed body.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        send(self.client.post(self.url(path)).json(&body)).await
    }

    /// GETs `path` and parses the JSON body (whatever the status).
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("JSON body")
    }

    /// The Prometheus scrape of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("scrape body")
    }

    /// POSTs JSON and returns the raw body text (for SSE streams).
    pub async fn post_text(&self, path: &str, body: &serde_json::Value) -> String {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request")
            .text()
            .await
            .expect("body")
    }

    /// POSTs JSON and returns the response body as a stream of chunks (to read a stream part-way).
    pub async fn post_stream(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> impl futures::Stream<Item = reqwest::Result<axum::body::Bytes>> {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200, "stream request");
        r.bytes_stream()
    }

    /// POSTs raw bytes with a JSON content type.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, serde_json::Value) {
        send(
            self.client
                .post(self.url(path))
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    /// Log lines printed so far (start-up included) and not drained yet.
    pub fn drain_log(&self) -> Vec<String> {
        let mut lines = std::mem::take(&mut *self.early.lock().expect("early lines"));
        lines.extend(self.log.try_iter());
        lines
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM to the server, as a platform stopping it does.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {}", self.pid());
    }

    /// Waits up to `within` for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python with the test clients: `AMLSERVE_TEST_PYTHON`, else `.venv/bin/python` (made by `make test-deps`).
pub fn python() -> PathBuf {
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

/// Runs `tests/python/<script>` with `args`, asserts it succeeded and printed `expect`, and returns its stdout.
pub async fn run_python(script: &str, args: &[&str], expect: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || Command::new(python()).arg(path).args(args).output())
        .await
        .expect("join")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(expect), "{stdout}");
    stdout.into_owned()
}

/// Sends a request and returns its status and body.
async fn send(req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    (status, parse_body(r.text().await.expect("body")))
}

/// A JSON body, or the raw text as a JSON string when it is not JSON.
fn parse_body(text: String) -> serde_json::Value {
    match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) => serde_json::Value::String(text),
    }
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// Asserts that an SSE body ran to its end: `[DONE]` after a last chunk whose finish_reason is `length`.
#[allow(dead_code)] // not every test binary streams
pub fn assert_stream_ran_to_length(body: &str, what: &str) {
    let events = sse_data(body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{what}");
    let finish: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).expect("last chunk is JSON");
    assert_eq!(finish["choices"][0]["finish_reason"], "length", "{what}: {finish}");
}

/// A greedy chat request body.
pub fn chat(content: &str, max_tokens: u32) -> serde_json::Value {
    serde_json::json!({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
}

/// The value of `name{labels}` in a scrape: the sum over the sample lines of that name that carry every label
/// given (each `key="value"` as rendered), as PromQL's `sum` would. Labels left out match any value, so
/// `amlserve_generation_tokens_total` is every model's total and
/// `amlserve_generation_tokens_total{model="chat"}` one model's. Panics when no line matches.
pub fn sample(scrape: &str, series: &str) -> f64 {
    let (name, wanted) = split_series(series);
    let mut total = None;
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        let Some((s, value)) = line.trim().rsplit_once(' ') else {
            continue;
        };
        let (n, labels) = split_series(s);
        if n == name && wanted.iter().all(|w| labels.contains(w)) {
            *total.get_or_insert(0.0) += value.parse::<f64>().expect("number");
        }
    }
    total.unwrap_or_else(|| panic!("{series} not in scrape:\n{scrape}"))
}

/// `name{a="x",b="y"}` -> (`name`, [`a="x"`, `b="y"`]) (label values here never hold commas).
fn split_series(series: &str) -> (&str, Vec<&str>) {
    match series.split_once('{') {
        Some((name, rest)) => (
            name,
            rest.trim_end_matches('}')
                .split(',')
                .filter(|l| !l.is_empty())
                .collect(),
        ),
        None => (series, Vec::new()),
    }
}
