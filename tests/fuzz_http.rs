//! Request bodies for every POST route against the real server: valid bodies mutated (fields replaced by
//! values of the wrong type, huge or NaN-looking numbers, deep nesting, removed, duplicated or unknown fields),
//! arbitrary JSON, and raw bytes that are not quite JSON. Every answer must be 2xx or 4xx (never 5xx; nor 429
//! or 503, as one client sending one request at a time never fills a queue), a 4xx must carry the route's
//! error shape, a stream must be well-formed events, every answer must arrive in bounded time, and `/health`
//! must still answer 200 after the run.
//!
//! One server per route, reused across its cases; generation limits are cut to 4 tokens (`max_tokens` and its
//! kin in 5..100,000 become 4, the server's default is 4) so a case costs milliseconds.

mod common;
#[path = "common/fuzz.rs"]
mod fuzz;

use std::time::Duration;

use common::Server;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{json, Map, Value};

/// Longest one answer may take (two busy cores, a prompt of a few hundred tokens, 16 choices of 4 tokens).
const MAX_ANSWER: Duration = Duration::from_secs(60);

/// Cases per route in `make test`.
const CI_CASES: u32 = 128;

/// How a route answers errors.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    /// `{"error": {"message", "type", ...}}`
    OpenAi,
    /// `{"message": ...}`
    AzureMl,
}

/// A route, its error shape and valid bodies to mutate.
struct Route {
    path: &'static str,
    shape: Shape,
    seeds: Vec<Value>,
}

fn chat_seeds() -> Vec<Value> {
    let user = |c: &str| json!([{"role": "user", "content": c}]);
    let weather = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    vec![
        json!({"messages": user("hi"), "max_tokens": 4}),
        json!({"messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "seed": 1,
            "stop": ["\n", "."], "n": 2, "presence_penalty": 0.5, "frequency_penalty": 0.5}),
        json!({"messages": user("hi"), "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 4}),
        json!({"messages": user("weather in Paris?"), "tools": weather, "tool_choice": "auto", "max_tokens": 4}),
        json!({"messages": user("weather?"), "tools": weather, "stream": true,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 4}),
        json!({"messages": [{"role": "user", "content": "x"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}, {"role": "developer", "content": "ok"}],
            "max_tokens": 4}),
        json!({"messages": user("json"), "response_format": {"type": "json_object"}, "max_tokens": 4,
            "logprobs": true, "top_logprobs": 2}),
        json!({"messages": user("x"), "response_format": {"type": "json_schema", "json_schema": {"name": "s",
            "strict": true, "schema": {"type": "object", "properties": {"a": {"type": "integer"}},
            "required": ["a"], "additionalProperties": false}}}, "max_tokens": 4}),
        json!({"messages": user("pick"), "structured_outputs": {"choice": ["yes", "no"]}, "max_tokens": 4,
            "logit_bias": {"100": -100, "200": 5}, "repetition_penalty": 1.1, "ignore_eos": false}),
        json!({"messages": user("id"), "structured_outputs": {"regex": "[a-z]{1,3}"}, "max_completion_tokens": 4,
            "parallel_tool_calls": false, "user": "u", "model": "m"}),
    ]
}

fn completion_seeds() -> Vec<Value> {
    vec![
        json!({"prompt": "Hello", "max_tokens": 4}),
        json!({"prompt": ["a", "b c"], "max_tokens": 2, "logprobs": 2, "temperature": 0.5, "seed": 3}),
        json!({"prompt": "Once", "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 3}),
        json!({"prompt": "Answer:", "structured_outputs": {"choice": ["yes", "no"]}, "stop": "\n", "n": 2}),
        json!({"prompt": "{", "response_format": {"type": "json_object"}, "max_tokens": 4, "best_of": 1}),
    ]
}

fn score_seeds() -> Vec<Value> {
    vec![
        json!({"input_data": {"input_string": [{"role": "user", "content": "hi"}],
            "parameters": {"max_new_tokens": 4}}}),
        json!({"input_data": {"input_string": ["Hello", "Bye"], "parameters": {"max_new_tokens": 3,
            "do_sample": true, "temperature": 0.5, "top_p": 0.9, "top_k": 4, "repetition_penalty": 1.1, "seed": 2}}}),
        json!({"inputs": "Hello", "parameters": {"max_new_tokens": 4, "return_full_text": false, "stop": ["."]}}),
        json!({"inputs": ["a", "b"], "parameters": null}),
    ]
}

fn routes() -> Vec<Route> {
    let openai = |path, seeds| Route {
        path,
        shape: Shape::OpenAi,
        seeds,
    };
    vec![
        openai("/v1/chat/completions", chat_seeds()),
        openai("/chat/completions", chat_seeds()),
        openai("/v1/completions", completion_seeds()),
        Route {
            path: "/score",
            shape: Shape::AzureMl,
            seeds: score_seeds(),
        },
        openai(
            "/tokenize",
            vec![
                json!({"prompt": "hi"}),
                json!({"prompt": "hi <|im_start|>", "add_special_tokens": false, "return_token_strs": true}),
                json!({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": true,
                    "add_special_tokens": false, "model": "m"}),
            ],
        ),
        openai(
            "/detokenize",
            vec![json!({"tokens": [1, 2, 3]}), json!({"tokens": [], "model": "m"})],
        ),
        openai(
            "/v1/embeddings",
            vec![
                json!({"input": "hello"}),
                json!({"input": ["a", "b"], "encoding_format": "base64", "model": "m"}),
                json!({"input": "x", "dimensions": 384, "encoding_format": "float"}),
            ],
        ),
    ]
}

/// JSON values that tend to break handlers: wrong types, extreme and NaN-looking numbers, odd strings.
fn hostile_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        proptest::sample::select(vec![
            json!(0),
            json!(-1),
            json!(1),
            json!(4),
            json!(4.0),
            json!(16),
            json!(17),
            json!(8192),
            json!(2_147_483_648u64),
            json!(9_007_199_254_740_993u64),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(1e308),
            json!(-1e308),
            json!(5e-324),
            json!(-0.0),
            json!(0.5),
            json!(1.5),
            json!(1e19),
            json!(-1e19),
        ]),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        proptest::sample::select(vec![
            "",
            "NaN",
            "nan",
            "Infinity",
            "-Infinity",
            "1e999",
            "-0",
            "null",
            "true",
            "4",
            "0x10",
            "user",
            "assistant",
            "system",
            "tool",
            "function",
            "developer",
            "text",
            "image_url",
            "json_object",
            "json_schema",
            "auto",
            "none",
            "required",
            "float",
            "base64",
            "<|im_start|>",
            "<|im_end|>",
            "\u{0}",
            "\u{fffd}",
            "\u{202e}",
            "👩\u{200d}👩\u{200d}👧",
            "{\"a\": 1}",
            "[",
            "(a*)*b",
            "[^\\d]{0,99}x",
            "(a{1000}){1000}",
            "\\",
            "(?i)",
            ".*",
        ])
        .prop_map(|s| Value::String(s.into())),
        any::<String>().prop_map(Value::String),
        (1usize..300).prop_map(|n| Value::String("ab ".repeat(n))),
        Just(json!([])),
        Just(json!({})),
        Just(json!([[]])),
    ]
}

/// Arbitrary JSON: hostile leaves in arrays and objects, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    hostile_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec(("[a-z_]{1,12}", inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// One edit of a JSON body, at a node chosen by index (wrapped) among all nodes.
#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, Value),
    Remove(usize),
    /// A field added to the object at (or holding) the node: unknown names and known ones.
    AddField(usize, String, Value),
    /// The node put in an array, or an object under the key.
    Wrap(usize, Option<String>),
    /// The node nested this many arrays deep (past serde_json's limit of 128 too).
    Nest(usize, usize),
    /// An array node's elements repeated this many times.
    Repeat(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let field = prop_oneof![
        "[a-z_]{1,12}",
        proptest::sample::select(vec![
            "stream",
            "n",
            "max_tokens",
            "messages",
            "prompt",
            "tools",
            "tool_choice",
            "response_format",
            "structured_outputs",
            "logprobs",
            "top_logprobs",
            "stop",
            "seed",
            "temperature",
            "logit_bias",
            "content",
            "role",
            "tool_calls",
            "name",
            "parameters",
            "input",
            "tokens",
            "encoding_format",
            "dimensions",
            "inputs",
            "input_data",
            "input_string",
            "ignore_eos",
            "echo",
            "suffix",
            "type",
        ])
        .prop_map(str::to_string),
    ];
    prop_oneof![
        5 => (any::<usize>(), prop_oneof![3 => hostile_leaf(), 1 => any_json()]).prop_map(|(i, v)| Edit::Replace(i, v)),
        2 => any::<usize>().prop_map(Edit::Remove),
        2 => (any::<usize>(), field.clone(), hostile_leaf()).prop_map(|(i, k, v)| Edit::AddField(i, k, v)),
        1 => (any::<usize>(), proptest::option::of(field)).prop_map(|(i, k)| Edit::Wrap(i, k)),
        1 => (any::<usize>(), prop_oneof![1usize..20, 100usize..140, Just(1_000usize)]).prop_map(|(i, d)| Edit::Nest(i, d)),
        1 => (any::<usize>(), 2usize..40).prop_map(|(i, n)| Edit::Repeat(i, n)),
    ]
}

/// A step from a node to a child.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

/// Every node's path, the root first.
fn paths(v: &Value) -> Vec<Vec<Step>> {
    fn walk(v: &Value, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
        out.push(here.clone());
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    here.push(Step::Key(k.clone()));
                    walk(child, here, out);
                    here.pop();
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    here.push(Step::Index(i));
                    walk(child, here, out);
                    here.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

fn node<'a>(v: &'a mut Value, path: &[Step]) -> &'a mut Value {
    path.iter().fold(v, |v, step| match step {
        Step::Key(k) => &mut v[k.as_str()],
        Step::Index(i) => &mut v[*i],
    })
}

fn apply(body: &mut Value, e: &Edit) {
    let all = paths(body);
    let pick = |i: usize| all[i % all.len()].clone();
    match e {
        Edit::Replace(i, v) => *node(body, &pick(*i)) = v.clone(),
        Edit::Remove(i) => {
            let path = pick(*i);
            if let Some((last, parent)) = path.split_last() {
                match (node(body, parent), last) {
                    (Value::Object(m), Step::Key(k)) => {
                        m.remove(k);
                    }
                    (Value::Array(a), Step::Index(j)) => {
                        a.remove(*j);
                    }
                    _ => {}
                }
            }
        }
        Edit::AddField(i, k, v) => {
            let mut path = pick(*i);
            loop {
                if let Value::Object(m) = node(body, &path) {
                    m.insert(k.clone(), v.clone());
                    break;
                }
                if path.pop().is_none() {
                    break;
                }
            }
        }
        Edit::Wrap(i, key) => {
            let n = node(body, &pick(*i));
            let inner = n.take();
            *n = match key {
                Some(k) => json!({ k.as_str(): inner }),
                None => json!([inner]),
            };
        }
        Edit::Nest(i, depth) => {
            let n = node(body, &pick(*i));
            let mut v = n.take();
            for _ in 0..*depth {
                v = Value::Array(vec![v]);
            }
            *n = v;
        }
        Edit::Repeat(i, times) => {
            if let Value::Array(a) = node(body, &pick(*i)) {
                let once = a.clone();
                for _ in 1..*times {
                    a.extend(once.iter().cloned());
                }
            }
        }
    }
}

/// Cuts generation limits to 4 tokens wherever a body may carry them, so valid cases stay fast; values
/// outside 5..100,000 (0, negative, huge, fractional) are kept, as the server must refuse them quickly.
fn cap_generation(v: &mut Value) {
    const LIMITS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_new_tokens"];
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                let big = child.as_f64().is_some_and(|x| (5.0..100_000.0).contains(&x));
                if LIMITS.contains(&k.as_str()) && big {
                    *child = json!(4);
                } else {
                    cap_generation(child);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(cap_generation),
        _ => {}
    }
}

/// A request body: JSON, or bytes that are not quite JSON.
#[derive(Debug, Clone)]
enum Body {
    Json(Value),
    Raw(Vec<u8>),
}

/// Changes to a body's bytes.
#[derive(Debug, Clone)]
enum ByteEdit {
    Cut(usize),
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    let junk = prop_oneof![
        proptest::sample::select(vec![
            &b"\xff"[..],
            b"\xc3",
            b"\0",
            b",",
            b"}",
            b"]]]]",
            b"\"",
            b"\\",
            b"NaN",
            b"1e999999",
            b"-",
            b"\"stream\":true,",
            b"\"max_tokens\":4,",
            b"/*",
        ])
        .prop_map(<[u8]>::to_vec),
        proptest::collection::vec(any::<u8>(), 1..8),
    ];
    prop_oneof![
        any::<usize>().prop_map(ByteEdit::Cut),
        (any::<usize>(), 1u8..=255).prop_map(|(i, m)| ByteEdit::Flip(i, m)),
        (any::<usize>(), junk).prop_map(|(i, b)| ByteEdit::Insert(i, b)),
    ]
}

fn body(seeds: Vec<Value>) -> impl Strategy<Value = Body> {
    let pick = proptest::sample::select(seeds);
    prop_oneof![
        1 => pick.clone().prop_map(Body::Json),
        8 => (pick.clone(), proptest::collection::vec(edit(), 1..4)).prop_map(|(mut v, edits)| {
            for e in &edits {
                apply(&mut v, e);
            }
            Body::Json(v)
        }),
        1 => any_json().prop_map(Body::Json),
        2 => (pick, proptest::collection::vec(byte_edit(), 1..3)).prop_map(|(v, edits)| {
            let mut b = serde_json::to_vec(&v).expect("serializes");
            for e in edits {
                match e {
                    ByteEdit::Cut(i) => b.truncate(i % (b.len() + 1)),
                    ByteEdit::Flip(i, m) if !b.is_empty() => {
                        let n = b.len();
                        b[i % n] ^= m;
                    }
                    ByteEdit::Flip(..) => {}
                    ByteEdit::Insert(i, junk) => {
                        let at = i % (b.len() + 1);
                        b.splice(at..at, junk);
                    }
                }
            }
            Body::Raw(b)
        }),
    ]
    .prop_map(|b| match b {
        Body::Json(mut v) => {
            cap_generation(&mut v);
            Body::Json(v)
        }
        raw => raw,
    })
}

/// The Azure AI route's `extra-parameters` header, sometimes.
fn extra_parameters() -> impl Strategy<Value = Option<&'static str>> {
    proptest::option::weighted(
        0.3,
        proptest::sample::select(vec!["error", "drop", "pass-through", "bogus"]),
    )
}

/// Sends one body and checks the answer; `Err` says what is wrong with it.
async fn check(s: &Server, route: &Route, body: &Body, extra: Option<&str>) -> Result<(), String> {
    let bytes = match body {
        Body::Json(v) => serde_json::to_vec(v).expect("serializes"),
        Body::Raw(b) => b.clone(),
    };
    let mut req = s
        .client
        .post(s.url(route.path))
        .header("content-type", "application/json")
        .timeout(MAX_ANSWER)
        .body(bytes);
    if let Some(x) = extra.filter(|_| route.path == "/chat/completions") {
        req = req.header("extra-parameters", x);
    }
    let r = req
        .send()
        .await
        .map_err(|e| format!("no answer in {MAX_ANSWER:?}: {e}"))?;
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = r
        .text()
        .await
        .map_err(|e| format!("{status}: the body did not arrive: {e}"))?;
    let fail = |why: &str| {
        Err(format!(
            "{status} {why}: {}",
            text.chars().take(600).collect::<String>()
        ))
    };
    if !(200..300).contains(&status) && !(400..500).contains(&status) || status == 429 {
        return fail("is neither 2xx nor 4xx (or is a 429 to a lone client)");
    }
    if ctype.starts_with("text/event-stream") {
        if status != 200 {
            return fail("streams with a non-200 status");
        }
        let data = common::sse_data(&text);
        if data.last().map(String::as_str) != Some("[DONE]") {
            return fail("is a stream that does not end with [DONE]");
        }
        for d in &data[..data.len() - 1] {
            let v: Value = serde_json::from_str(d).map_err(|e| format!("an event is not JSON ({e}): {d}"))?;
            if v["error"]["type"] == "server_error" {
                return fail("is a stream that failed inside the server");
            }
        }
        return Ok(());
    }
    let v: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) => return fail("has a body that is not JSON"),
    };
    if status >= 400 {
        let message = match route.shape {
            Shape::OpenAi if v["error"]["type"].is_string() => v["error"]["message"].as_str(),
            Shape::AzureMl => v["message"].as_str(),
            Shape::OpenAi => None,
        };
        if message.is_none_or(str::is_empty) {
            return fail(&format!("lacks the {:?} error shape", route.shape));
        }
    } else if !(v.is_object() || v.is_array()) {
        return fail("is a success whose body is neither an object nor a list");
    }
    Ok(())
}

/// Fuzzes one route against its own server, then checks the server is still healthy.
fn fuzz_route(path: &str) {
    let route = routes().into_iter().find(|r| r.path == path).expect("route");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let s = rt.block_on(Server::start(&["--default-max-tokens", "4"]));
    let mut runner = TestRunner::new(fuzz::config(CI_CASES));
    let result = runner.run(&(body(route.seeds.clone()), extra_parameters()), |(b, extra)| {
        rt.block_on(check(&s, &route, &b, extra)).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{path}: {e}");
    }
    let health = rt.block_on(async { s.client.get(s.url("/health")).send().await.map(|r| r.status().as_u16()) });
    assert_eq!(health.ok(), Some(200), "{path}: /health after the run");
}

/// Found by this fuzzing: the regex compiles (llguidance builds its lexer lazily), then exhausts the lexer's
/// budget on the first tokens. That ended as a 500 (a `server_error` event when streamed); a grammar that fails
/// mid-generation is now the request's fault: a 400, or an `invalid_request_error` event.
#[test]
fn a_grammar_that_exhausts_the_lexer_is_a_client_error() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let s = Server::start(&["--default-max-tokens", "4"]).await;
        for stream in [false, true] {
            let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": stream,
                "structured_outputs": {"regex": "(a{1000}){1000}"}});
            let text = s.post_text("/v1/chat/completions", &body).await;
            assert!(!text.contains("server_error"), "stream {stream}: {text}");
            assert!(text.contains("invalid_request_error"), "stream {stream}: {text}");
        }
    });
}

#[test]
fn chat_completions_bodies() {
    fuzz_route("/v1/chat/completions");
}

#[test]
fn azure_ai_chat_completions_bodies() {
    fuzz_route("/chat/completions");
}

#[test]
fn completions_bodies() {
    fuzz_route("/v1/completions");
}

#[test]
fn score_bodies() {
    fuzz_route("/score");
}

#[test]
fn tokenize_bodies() {
    fuzz_route("/tokenize");
}

#[test]
fn detokenize_bodies() {
    fuzz_route("/detokenize");
}

#[test]
fn embeddings_bodies() {
    fuzz_route("/v1/embeddings");
}
