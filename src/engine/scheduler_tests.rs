//! Unit tests of the scheduler against the deterministic [`StubBackend`], driven turn by turn on the test's
//! own thread: admission order, token and KV budgets, chunked prefill beside running streams, cancellation,
//! deadlines, the prefix cache, failed steps and backpressure.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::UnboundedReceiver;

use super::constraint::{Constraint, ConstraintError, TokenMask};
use super::logprobs::Sampled;
use super::scheduler::Scheduler;
use super::stub::{expected, text_of, Part, StubBackend, StubText, BYTES_PER_TOKEN};
use super::stub::{EOS, VOCAB};
use super::{Completion, Engine, EngineConfig, Event, FinishReason, GenerateRequest, GenerationParams, SubmitError};
use crate::metrics::{Metrics, ModelMetrics};

fn config() -> EngineConfig {
    EngineConfig {
        max_batch_size: 8,
        max_batch_tokens: 64,
        max_prefill_tokens_alone: 64,
        cuda_graphs: false,
        kv_cache_from_device: false,
        kv_cache_bytes: 1000 * BYTES_PER_TOKEN,
        max_waiting: 16,
        prefix_cache_bytes: 0,
    }
}

fn request(id: &str, prompt: &[u32], max_tokens: usize) -> GenerateRequest {
    let params = GenerationParams {
        max_tokens,
        temperature: 0.0,
        ..Default::default()
    };
    GenerateRequest::new(id, prompt.to_vec(), params, None)
}

struct Harness {
    engine: Engine,
    sched: Scheduler<StubBackend>,
    stub: StubBackend,
    metrics: Arc<ModelMetrics>,
}

impl Harness {
    fn new(config: EngineConfig) -> Self {
        Self::with_stub(config, StubBackend::default())
    }

    fn with_stub(config: EngineConfig, stub: StubBackend) -> Self {
        let metrics = Metrics::new().model("stub");
        let (engine, rx) = Engine::channel(config.clone(), metrics.clone(), BYTES_PER_TOKEN);
        let sched = Scheduler::new(
            stub.clone(),
            Arc::new(StubText),
            config,
            rx,
            engine.stats.clone(),
            metrics.clone(),
        );
        Self {
            engine,
            sched,
            stub,
            metrics,
        }
    }

    fn submit(&self, req: GenerateRequest) -> UnboundedReceiver<Event> {
        self.engine.submit(req).expect("queued")
    }

    fn submit_choices(&self, req: GenerateRequest) -> Vec<UnboundedReceiver<Event>> {
        let slot = self.engine.reserve(1).expect("a place").pop().expect("one slot");
        slot.submit_choices(req).expect("queued")
    }

    fn turn(&mut self) {
        assert!(self.sched.intake(false));
        self.sched.turn();
    }

    /// Turns until nothing runs or waits; the number of turns taken.
    fn run_idle(&mut self) -> usize {
        for turns in 0..1000 {
            if turns > 0 && self.sched.running.is_empty() && self.sched.waiting.is_empty() {
                return turns;
            }
            self.turn();
        }
        panic!("the scheduler did not go idle in 1000 turns");
    }

    fn count(&self, outcome: &str) -> u64 {
        self.metrics.finished_count(outcome)
    }
}

/// What a receiver holds so far.
#[derive(Debug, Default)]
struct Seen {
    text: String,
    tokens: Vec<Sampled>,
    done: Option<Completion>,
    error: Option<String>,
}

fn seen(rx: &mut UnboundedReceiver<Event>) -> Seen {
    let mut s = Seen::default();
    loop {
        match rx.try_recv() {
            Ok(Event::Text(t)) => s.text.push_str(&t),
            Ok(Event::Token(t)) => s.tokens.push(t),
            Ok(Event::Done(d)) => s.done = Some(d),
            Ok(Event::Error(e) | Event::Refused(e)) => s.error = Some(e),
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => return s,
        }
    }
}

fn total_tokens(step: &[Part]) -> usize {
    step.iter().map(|p| p.len).sum()
}

#[test]
fn admits_first_come_first_served_and_outputs_follow_the_model() {
    let mut h = Harness::new(EngineConfig {
        max_batch_size: 1,
        ..config()
    });
    let prompts: [&[u32]; 3] = [&[1, 2, 3], &[4, 5], &[6, 7, 8, 9]];
    let mut rxs: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| h.submit(request(&format!("r{i}"), p, 4)))
        .collect();
    h.turn();
    assert_eq!(h.sched.running.len(), 1);
    assert_eq!(h.sched.waiting.len(), 2);
    assert_eq!(h.engine.stats().waiting(), 2);
    assert_eq!(h.metrics.waiting.get(), 2, "the gauge follows the queue");
    let mut finished_at = Vec::new();
    for turn in 0..100 {
        for (i, rx) in rxs.iter_mut().enumerate() {
            let s = seen(rx);
            if let Some(done) = s.done {
                assert_eq!(done.reason, FinishReason::Length);
                assert_eq!(done.completion_tokens, 4);
                finished_at.push((i, turn));
            }
        }
        if finished_at.len() == 3 {
            break;
        }
        h.turn();
    }
    let order: Vec<usize> = finished_at.iter().map(|&(i, _)| i).collect();
    assert_eq!(order, [0, 1, 2], "one at a time, in arrival order");
    assert!(finished_at.windows(2).all(|w| w[0].1 < w[1].1));
    assert_eq!(h.engine.stats().waiting(), 0);
    assert_eq!(h.metrics.waiting.get(), 0);
    assert_eq!(h.count("length"), 3);
    // Outputs are what the stub model predicts for each prompt on its own.
    let mut h = Harness::new(config());
    let mut rxs: Vec<_> = prompts.iter().map(|p| h.submit(request("r", p, 4))).collect();
    h.run_idle();
    for (p, rx) in prompts.iter().zip(&mut rxs) {
        assert_eq!(seen(rx).text, text_of(&expected(p, 4)));
    }
}

#[test]
fn decodes_first_then_chunks_a_long_prompt_within_the_token_budget() {
    let mut h = Harness::new(EngineConfig {
        max_batch_tokens: 6,
        max_prefill_tokens_alone: 6,
        ..config()
    });
    let mut short: Vec<_> = [[1u32, 2], [3, 4]]
        .iter()
        .map(|p| h.submit(request("short", p, 12)))
        .collect();
    h.turn();
    assert_eq!(h.stub.log()[0].iter().map(|p| p.len).collect::<Vec<_>>(), [2, 2]);
    let long: Vec<u32> = (1..=20).collect();
    let mut long_rx = h.submit(request("long", &long, 3));
    let before = h.stub.log().len();
    h.run_idle();
    let steps = h.stub.log();
    for step in &steps {
        assert!(total_tokens(step) <= 6, "step over the token budget: {step:?}");
    }
    // While the long prompt is read, both streams get their token every step, and the prompt gets the rest.
    let reading: Vec<&Vec<Part>> = steps[before..]
        .iter()
        .take_while(|s| s.iter().any(|p| p.len > 1))
        .collect();
    assert_eq!(reading.len(), 5, "20 prompt tokens at 4 a step");
    for (i, step) in reading.iter().enumerate() {
        assert_eq!(step.len(), 3);
        assert_eq!((step[0].len, step[1].len), (1, 1), "decode tokens come first");
        assert_eq!(step[2].start, 4 * i);
        assert_eq!(step[2].want_logits, i == 4, "logits only for the prompt's last chunk");
    }
    assert_eq!(seen(&mut long_rx).text, text_of(&expected(&long, 3)));
    for (p, rx) in [[1u32, 2], [3, 4]].iter().zip(&mut short) {
        assert_eq!(seen(rx).text, text_of(&expected(p, 12)));
    }
}

#[test]
fn a_prompt_alone_is_read_in_larger_chunks_than_beside_running_streams() {
    let mut h = Harness::new(EngineConfig {
        max_batch_tokens: 6,
        max_prefill_tokens_alone: 16,
        ..config()
    });
    let long: Vec<u32> = (1..=40).collect();
    let mut rx = h.submit(request("alone", &long, 3));
    h.run_idle();
    let lens: Vec<Vec<usize>> = h.stub.log().iter().map(|s| s.iter().map(|p| p.len).collect()).collect();
    assert_eq!(
        lens[..3],
        [vec![16], vec![16], vec![8]],
        "no stream decodes: chunks of 16"
    );
    assert_eq!(seen(&mut rx).text, text_of(&expected(&long, 3)));
    // Beside a decoding stream the same prompt goes back to the step budget of 6 tokens.
    let mut short = h.submit(request("short", &[1, 2], 12));
    h.turn();
    let mut again = h.submit(request("beside", &long, 3));
    let before = h.stub.log().len();
    h.run_idle();
    let steps = h.stub.log();
    let reading: Vec<&Vec<Part>> = steps[before..]
        .iter()
        .take_while(|s| s.iter().any(|p| p.len > 1))
        .collect();
    assert!(
        !reading.is_empty() && reading.iter().all(|s| total_tokens(s) <= 6),
        "{reading:?}"
    );
    assert_eq!(seen(&mut again).text, text_of(&expected(&long, 3)));
    assert_eq!(seen(&mut short).text, text_of(&expected(&[1, 2], 12)));
}

#[test]
fn waits_for_kv_room_and_admits_when_it_frees() {
    let mut h = Harness::new(EngineConfig {
        kv_cache_bytes: 30 * BYTES_PER_TOKEN,
        ..config()
    });
    let mut a = h.submit(request("a", &[1; 10], 10));
    let mut b = h.submit(request("b", &[2; 10], 10));
    let mut c = h.submit(request("c", &[3; 3], 2));
    h.turn();
    assert_eq!(h.sched.running.len(), 1, "b does not fit beside a");
    assert_eq!(h.sched.waiting.len(), 2, "c would fit, but does not overtake b");
    assert_eq!(
        h.engine.stats().kv_reserved_bytes.load(Ordering::SeqCst),
        20 * BYTES_PER_TOKEN
    );
    assert!((h.metrics.kv_cache_usage.get() - 20.0 / 30.0).abs() < 1e-9);
    while seen(&mut a).done.is_none() {
        assert_eq!(h.sched.waiting.len(), 2, "b and c wait while a runs");
        h.turn();
    }
    h.turn();
    assert_eq!(h.sched.running.len(), 2, "b and c admitted once a left");
    h.run_idle();
    assert_eq!(seen(&mut b).text, text_of(&expected(&[2; 10], 10)));
    assert_eq!(seen(&mut c).text, text_of(&expected(&[3; 3], 2)));
    assert_eq!(h.engine.stats().kv_reserved_bytes.load(Ordering::SeqCst), 0);
}

#[test]
fn refuses_what_can_never_fit_and_a_full_queue_before_any_work() {
    let h = Harness::new(EngineConfig {
        kv_cache_bytes: 30 * BYTES_PER_TOKEN,
        max_waiting: 2,
        ..config()
    });
    let too_large = h.engine.submit(request("big", &[1; 25], 10));
    assert!(matches!(too_large, Err(SubmitError::TooLarge { .. })), "{too_large:?}");
    assert_eq!(h.engine.stats().waiting(), 0, "the refused request's place is back");
    let mut slots = h.engine.reserve(2).expect("two places");
    assert_eq!(h.metrics.waiting.get(), 2);
    assert_eq!(
        h.engine.reserve(1).map(|_| ()),
        Err(SubmitError::QueueFull { waiting: 2 })
    );
    assert_eq!(h.count("rejected"), 2);
    drop(slots.pop());
    assert_eq!(h.engine.stats().waiting(), 1, "an unused place goes back");
    let rx = slots.pop().expect("slot").submit(request("a", &[1], 1));
    assert!(rx.is_ok());
    assert_eq!(h.engine.stats().waiting(), 1, "the queued job holds the place");
    assert!(h.engine.reserve(1).is_ok());
}

#[test]
fn a_request_cancelled_while_queued_never_runs() {
    let mut h = Harness::new(EngineConfig {
        max_batch_size: 1,
        ..config()
    });
    let _a = h.submit(request("a", &[1, 2], 20));
    let b = h.submit(request("b", &[3, 4, 5, 6, 7], 5));
    h.turn();
    drop(b);
    h.turn();
    assert!(h.sched.waiting.is_empty());
    assert_eq!(h.engine.stats().waiting(), 0);
    assert_eq!(h.count("cancelled"), 1);
    h.run_idle();
    assert!(
        h.stub.log().iter().all(|s| s.len() == 1 && s[0].len <= 2),
        "only a's tokens ever ran (b's prompt is 5 tokens)"
    );
}

#[test]
fn a_request_cancelled_while_running_leaves_within_a_turn() {
    let mut h = Harness::new(config());
    let rx = h.submit(request("a", &[1, 2, 3], 50));
    let mut other = h.submit(request("b", &[4], 3));
    for _ in 0..3 {
        h.turn();
    }
    drop(rx);
    h.turn();
    assert!(
        h.sched.running.iter().all(|s| s.id != "a"),
        "cancelled at the next turn"
    );
    assert_eq!(h.count("cancelled"), 1);
    let after = h.stub.log().len();
    h.run_idle();
    assert!(h.stub.log()[after..].iter().all(|s| s.len() == 1), "a no longer runs");
    assert_eq!(seen(&mut other).text, text_of(&expected(&[4], 3)));
    assert_eq!(h.engine.stats().kv_reserved_bytes.load(Ordering::SeqCst), 0);
}

#[test]
fn deadlines_end_queued_and_running_requests() {
    let mut h = Harness::new(config());
    let mut queued = h.submit(GenerateRequest {
        deadline: Some(Instant::now()),
        ..request("late", &[1, 2], 5)
    });
    let mut running = h.submit(GenerateRequest {
        deadline: Some(Instant::now() + Duration::from_millis(50)),
        ..request("slow", &[3, 4], 500)
    });
    h.turn();
    let s = seen(&mut queued);
    let done = s.done.expect("timed out in the queue");
    assert_eq!((done.reason, done.completion_tokens), (FinishReason::Timeout, 0));
    h.turn();
    std::thread::sleep(Duration::from_millis(60));
    h.turn();
    let s = seen(&mut running);
    let done = s.done.expect("timed out while running");
    assert_eq!(done.reason, FinishReason::Timeout);
    assert_eq!(done.completion_tokens, 2);
    assert_eq!(
        s.text,
        text_of(&expected(&[3, 4], 2)),
        "what was generated is delivered"
    );
    assert!(h.sched.running.is_empty());
    assert_eq!(h.count("timeout"), 2);
}

#[test]
fn prefix_cache_hits_give_the_same_output_and_skip_prefill() {
    let mut h = Harness::new(EngineConfig {
        prefix_cache_bytes: 500 * BYTES_PER_TOKEN,
        ..config()
    });
    let first: Vec<u32> = (1..=10).collect();
    let mut a = h.submit(request("a", &first, 3));
    h.run_idle();
    assert_eq!(seen(&mut a).done.expect("done").cached_tokens, 0);
    // Continue differently from what a generated, so exactly the 10 prompt tokens are shared.
    let x = if expected(&first, 1)[0] == 20 { 21 } else { 20 };
    let mut second = first.clone();
    second.extend([x, x]);
    let before = h.stub.log().len();
    let mut b = h.submit(request("b", &second, 5));
    h.run_idle();
    let s = seen(&mut b);
    assert_eq!(s.done.expect("done").cached_tokens, 10);
    assert_eq!(s.text, text_of(&expected(&second, 5)), "same as computed from scratch");
    assert_eq!(
        h.stub.log()[before][0],
        Part {
            start: 10,
            len: 2,
            want_logits: true,
            argmax_only: true
        },
        "prefill starts after the cached prefix"
    );
    assert_eq!(h.metrics.prefix_cache_hit_tokens.get(), 10);
}

#[test]
fn cached_prefixes_are_evicted_for_admissions() {
    let mut h = Harness::new(EngineConfig {
        kv_cache_bytes: 30 * BYTES_PER_TOKEN,
        prefix_cache_bytes: 30 * BYTES_PER_TOKEN,
        ..config()
    });
    let _a = h.submit(request("a", &[1; 10], 5));
    h.run_idle();
    assert_eq!(
        h.sched.prefix.bytes(),
        14 * BYTES_PER_TOKEN,
        "a's prompt and all but its last token"
    );
    let mut b = h.submit(request("b", &[2; 15], 10));
    h.turn();
    assert_eq!(h.sched.running.len(), 1, "b admitted after evicting a's cache");
    assert_eq!(h.sched.prefix.bytes(), 0);
    h.run_idle();
    assert_eq!(seen(&mut b).text, text_of(&expected(&[2; 15], 10)));
}

#[test]
fn a_failed_step_fails_the_running_requests_and_the_engine_goes_on() {
    let mut h = Harness::new(config());
    let mut a = h.submit(request("a", &[1, 2], 5));
    h.stub.fail_next.store(true, Ordering::SeqCst);
    h.turn();
    assert!(seen(&mut a).error.is_some());
    assert_eq!(h.count("error"), 1);
    assert_eq!(h.engine.stats().kv_reserved_bytes.load(Ordering::SeqCst), 0);
    let mut b = h.submit(request("b", &[1, 2], 5));
    h.run_idle();
    assert_eq!(seen(&mut b).text, text_of(&expected(&[1, 2], 5)));
}

#[test]
fn the_end_of_sequence_token_stops_generation() {
    let stub = StubBackend {
        eos_at_len: Some(5),
        ..Default::default()
    };
    let mut h = Harness::with_stub(config(), stub);
    let mut a = h.submit(request("a", &[1, 2, 3], 10));
    h.run_idle();
    let s = seen(&mut a);
    let done = s.done.expect("done");
    assert_eq!(
        (done.reason, done.completion_tokens),
        (FinishReason::Stop, 3),
        "the end token counts"
    );
    assert_eq!(s.text, text_of(&expected(&[1, 2, 3], 2)), "the end token has no text");
    assert_eq!(h.count("stop"), 1);
}

#[test]
fn the_engine_thread_serves_until_every_handle_is_gone() {
    let metrics = Metrics::new().model("stub");
    let (engine, thread) =
        Engine::start_with(StubBackend::default(), Arc::new(StubText), config(), metrics).expect("thread");
    let mut rx = engine.submit(request("a", &[1, 2, 3], 6)).expect("queued");
    let mut text = String::new();
    let done = loop {
        match rx.blocking_recv().expect("an event") {
            Event::Text(t) => text.push_str(&t),
            Event::Token(_) => {}
            Event::Done(d) => break d,
            Event::Error(e) | Event::Refused(e) => panic!("{e}"),
        }
    };
    assert_eq!((done.reason, done.completion_tokens), (FinishReason::Length, 6));
    assert_eq!(text, text_of(&expected(&[1, 2, 3], 6)));
    let stats = engine.stats.clone();
    drop(engine);
    thread.join().expect("the thread ends without panicking");
    assert!(!stats.alive.load(Ordering::SeqCst), "readiness sees the engine gone");
}

#[test]
fn gauges_show_an_admitted_request_running_before_its_first_token() {
    let mut h = Harness::new(config());
    let _rx = h.submit(request("a", &[1, 2], 5));
    assert!(h.sched.intake(false));
    h.sched.admit();
    assert_eq!(h.metrics.running.get(), 1);
    assert_eq!(h.engine.stats().running.load(Ordering::SeqCst), 1);
    assert!(h.metrics.kv_cache_usage.get() > 0.0);
}

/// A grammar over the stub's vocabulary: only ids divisible by `step` (and, after `len` tokens, only EOS);
/// fails its mask on `fail_at` tokens if set.
#[derive(Clone)]
struct EveryNth {
    step: u32,
    len: usize,
    seen: usize,
    fail_at: Option<usize>,
}

impl Constraint for EveryNth {
    fn mask(&mut self) -> Result<TokenMask, ConstraintError> {
        if self.fail_at == Some(self.seen) {
            return Err(ConstraintError("stub grammar failure".into()));
        }
        let mut m = TokenMask::none(VOCAB);
        if self.seen >= self.len {
            m.allow(EOS);
        } else {
            (1..VOCAB as u32)
                .filter(|i| i.is_multiple_of(self.step))
                .for_each(|i| m.allow(i));
        }
        Ok(m)
    }
    fn commit(&mut self, token: u32) -> Result<(), ConstraintError> {
        if !token.is_multiple_of(self.step) {
            return Err(ConstraintError(format!("token {token} was not allowed")));
        }
        self.seen += 1;
        Ok(())
    }
    fn is_finished(&self) -> bool {
        false
    }
    fn fork(&self) -> Box<dyn Constraint> {
        Box::new(self.clone())
    }
}

fn run_to_end(h: &mut Harness, rxs: &mut [UnboundedReceiver<Event>]) -> Vec<Seen> {
    let mut out: Vec<Seen> = rxs.iter().map(|_| Seen::default()).collect();
    for _ in 0..200 {
        h.turn();
        for (o, rx) in out.iter_mut().zip(rxs.iter_mut()) {
            let s = seen(rx);
            o.text.push_str(&s.text);
            o.tokens.extend(s.tokens);
            o.done = o.done.take().or(s.done);
            o.error = o.error.take().or(s.error);
        }
        if out.iter().all(|o| o.done.is_some() || o.error.is_some()) {
            break;
        }
    }
    out
}

#[test]
fn choices_share_one_prefill_and_are_seeded_per_choice() {
    let sampled = |seed| {
        let mut h = Harness::new(config());
        let req = GenerateRequest {
            n: 3,
            params: GenerationParams {
                max_tokens: 6,
                temperature: 1.0,
                seed: Some(seed),
                ..Default::default()
            },
            ..request("n3", &[1, 2, 3, 4, 5], 6)
        };
        let mut rxs = h.submit_choices(req);
        assert_eq!(rxs.len(), 3);
        let out = run_to_end(&mut h, &mut rxs);
        let prompt_reads: usize = h
            .stub
            .log()
            .iter()
            .flatten()
            .filter(|p| p.start == 0)
            .map(|p| p.len)
            .sum();
        assert_eq!(prompt_reads, 5, "the prompt is read once for the three choices");
        out.into_iter()
            .map(|o| {
                let d = o.done.expect("finished");
                assert_eq!((d.prompt_tokens, d.completion_tokens), (5, 6));
                o.text
            })
            .collect::<Vec<_>>()
    };
    let a = sampled(7);
    assert_eq!(a, sampled(7), "a seeded request gives the same choices again");
    assert!(a[0] != a[1] || a[1] != a[2], "choices are sampled apart: {a:?}");
    let mut h = Harness::new(config());
    let req = GenerateRequest {
        n: 2,
        ..request("greedy", &[9, 8], 4)
    };
    let mut rxs = h.submit_choices(req);
    let out = run_to_end(&mut h, &mut rxs);
    for o in out {
        assert_eq!(o.text, text_of(&expected(&[9, 8], 4)));
    }
    assert_eq!(h.sched.kv_reserved, 0, "every choice gave its reservation back");
}

#[test]
fn a_grammar_limits_every_token_and_ends_where_it_accepts() {
    let mut h = Harness::new(config());
    let grammar = EveryNth {
        step: 3,
        len: 4,
        seen: 0,
        fail_at: None,
    };
    let req = GenerateRequest {
        constraint: Some(Box::new(grammar.clone())),
        params: GenerationParams {
            max_tokens: 50,
            temperature: 1.0,
            seed: Some(1),
            logprobs: Some(2),
            ..Default::default()
        },
        ..request("g", &[1, 2], 50)
    };
    let failing = GenerateRequest {
        constraint: Some(Box::new(EveryNth {
            fail_at: Some(2),
            ..grammar
        })),
        ..request("bad", &[3, 4], 50)
    };
    let plain = request("plain", &[5, 6], 5);
    let mut rxs = vec![h.submit(req), h.submit(failing), h.submit(plain)];
    let out = run_to_end(&mut h, &mut rxs);
    let done = out[0].done.as_ref().expect("finished");
    assert_eq!(
        (done.reason, done.completion_tokens),
        (FinishReason::Stop, 5),
        "EOS (counted) once the grammar accepts"
    );
    assert_eq!(out[0].tokens.len(), 4, "one logprob report per token, EOS not reported");
    assert!(out[0].tokens.iter().all(|t| t.id.is_multiple_of(3) && t.top.len() == 2));
    assert!(
        out[1]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("stub grammar failure")),
        "{:?}",
        out[1]
    );
    assert_eq!(out[2].text, text_of(&expected(&[5, 6], 5)), "the batch goes on");
    assert_eq!(h.metrics.constrained_requests.get(), 2);
    assert!(h.metrics.constraint_mask.get_sample_count() >= 6);
}

#[test]
fn greedy_picks_the_token_with_the_highest_logprob() {
    let mut h = Harness::new(config());
    let req = GenerateRequest {
        params: GenerationParams {
            max_tokens: 5,
            temperature: 0.0,
            logprobs: Some(3),
            ..Default::default()
        },
        ..request("lp", &[4, 4], 5)
    };
    let mut rxs = vec![h.submit(req)];
    let out = run_to_end(&mut h, &mut rxs);
    let ids: Vec<u32> = out[0].tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, expected(&[4, 4], 5));
    for t in &out[0].tokens {
        assert_eq!(t.top[0].0, t.id);
        assert!((t.top[0].1 - t.logprob).abs() < 1e-6 && t.logprob < 0.0);
    }
}

#[test]
fn plain_greedy_rows_come_back_as_their_argmax_and_the_others_whole() {
    let penalised = |id: &str, prompt: &[u32]| GenerateRequest {
        params: GenerationParams {
            max_tokens: 4,
            temperature: 0.0,
            presence_penalty: 0.5,
            ..Default::default()
        },
        ..request(id, prompt, 4)
    };
    // (requests, whether their wanted rows may come back as argmax)
    let cases: [(Vec<GenerateRequest>, bool); 3] = [
        (vec![request("greedy", &[1, 2, 3], 4)], true),
        (vec![penalised("penalised", &[4, 5])], false),
        // Together: the greedy row is flagged, the step returns whole rows for both (the stub, as the device
        // backend, returns indices only when every wanted row is flagged).
        (
            vec![request("greedy", &[1, 2, 3], 4), penalised("penalised", &[4, 5])],
            false,
        ),
    ];
    for (reqs, all_argmax) in cases {
        let mut h = Harness::new(config());
        let prompts: Vec<Vec<u32>> = reqs.iter().map(|r| r.prompt.clone()).collect();
        let mut rxs: Vec<_> = reqs.into_iter().map(|r| h.submit(r)).collect();
        let out = run_to_end(&mut h, &mut rxs);
        for (o, prompt) in out.iter().zip(&prompts) {
            assert_eq!(o.text, text_of(&expected(prompt, 4)), "the same tokens either way");
        }
        let log = h.stub.log();
        let wanted: Vec<&Part> = log.iter().flatten().filter(|p| p.want_logits).collect();
        assert_eq!(wanted.len(), 4 * prompts.len());
        let flagged = wanted.iter().filter(|p| p.argmax_only).count();
        let steps_by_argmax = log
            .iter()
            .filter(|step| step.iter().any(|p| p.want_logits))
            .filter(|step| step.iter().filter(|p| p.want_logits).all(|p| p.argmax_only))
            .count();
        match (all_argmax, prompts.len()) {
            (true, _) => assert_eq!((flagged, steps_by_argmax), (4, 4)),
            (false, 1) => assert_eq!((flagged, steps_by_argmax), (0, 0)),
            (false, _) => assert_eq!(flagged, 4, "the greedy request's rows are flagged"),
        }
    }
}
