//! Constrained decoding costs with the real SmolLM2 tokenizer (49,152 tokens): grammar compile time per spec,
//! cold and cached, and the per-token mask time while a valid document is fed token by token.
//!
//! `make bench-grammar` (or `cargo bench --bench grammar -- [--steps 400]`). Prints a markdown table; no number
//! passes or fails anything.

use std::path::PathBuf;
use std::time::Instant;

use amlserve::grammar::{GrammarSpec, Grammars};
use amlserve::model::TextTokenizer;
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Mask computations timed per spec.
    #[arg(long, default_value_t = 400)]
    steps: usize,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(amlserve::config::DEFAULT_MODEL);
    let mut f = std::io::BufReader::new(std::fs::File::open(&path)?);
    let content = candle_core::quantized::gguf_file::Content::read(&mut f)?;
    let tok = TextTokenizer::from_gguf(&content)?;
    let t0 = Instant::now();
    let grammars = Grammars::new(&tok, 64)?;
    let setup = t0.elapsed().as_secs_f64();
    let uncached = Grammars::new(&tok, 0)?;

    let person = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"}, "age": {"type": "integer"},
            "email": {"type": "string", "format": "email"}, "ok": {"type": "boolean"}
        },
        "required": ["name", "age", "ok"], "additionalProperties": false
    });
    let order = json!({
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
            "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
            "items": {"type": "array", "minItems": 1, "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}, "price": {"type": "number"}},
                "required": ["sku", "qty", "price"], "additionalProperties": false
            }},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}
        },
        "required": ["id", "status", "items", "note"], "additionalProperties": false
    });
    let order_doc = r#"{"id":"ORD-123456","status":"shipped","items":[{"sku":"A-1","qty":2,"price":9.99},{"sku":"B-22","qty":1,"price":120.5},{"sku":"C-333","qty":10,"price":0.25}],"note":"Leave the parcel at the back door, please; the front one sticks."}"#;
    let cases: Vec<(&str, GrammarSpec, String)> = vec![
        ("json_object", GrammarSpec::JsonObject, order_doc.to_string()),
        (
            "schema: person",
            GrammarSpec::JsonSchema {
                schema: person,
                strict: true,
            },
            r#"{"name":"Ada Lovelace, Countess of Lovelace","age":36,"email":"ada@example.org","ok":true}"#.into(),
        ),
        (
            "schema: order (nested)",
            GrammarSpec::JsonSchema {
                schema: order,
                strict: true,
            },
            order_doc.into(),
        ),
        (
            "regex: date",
            GrammarSpec::Regex(r"\d{4}-\d{2}-\d{2}".into()),
            "2026-12-02".into(),
        ),
        (
            "choice: 4",
            GrammarSpec::Choice(["positive", "negative", "neutral", "mixed"].map(String::from).to_vec()),
            "negative".into(),
        ),
    ];

    println!(
        "tokenizer: {} tokens; token trie and parser factory built in {:.0} ms",
        tok.vocab_size(),
        setup * 1e3
    );
    println!();
    println!(
        "| spec | compile cold (ms) | compile cached (µs) | 1st walk: mask p50 / max (µs) | mask p50 (µs) | mask p99 (µs) | \
         mask max (µs) | allowed (mean) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, spec, doc) in cases {
        let cold = median_of(
            (0..3)
                .map(|_| uncached.compile_traced(&spec).map(|(_, i)| i.seconds))
                .collect::<Result<_, _>>()?,
        );
        grammars.compile(&spec)?;
        let cached = median_of(
            (0..100)
                .map(|_| grammars.compile_traced(&spec).map(|(_, i)| i.seconds))
                .collect::<Result<_, _>>()?,
        );
        let compiled = grammars.compile(&spec)?;
        let ids = tok.encode(&doc)?;
        let mut times = Vec::with_capacity(args.steps);
        let mut allowed = 0usize;
        let mut first_walk = Vec::new();
        while times.len() < args.steps {
            let mut c = compiled.start()?;
            for &id in &ids {
                let t = Instant::now();
                let mask = c.mask()?;
                times.push(t.elapsed().as_secs_f64());
                allowed += mask.count();
                anyhow::ensure!(
                    mask.allows(id),
                    "{name}: the sample document's token {id} is not allowed"
                );
                c.commit(id)?;
            }
            anyhow::ensure!(
                c.mask()?.allows(tok.eos_id),
                "{name}: the sample document does not complete"
            );
            if first_walk.is_empty() {
                first_walk = times.clone();
                first_walk.sort_by(f64::total_cmp);
            }
        }
        let n = times.len();
        times.sort_by(f64::total_cmp);
        println!(
            "| {name} | {:.1} | {:.1} | {:.0} / {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            cold * 1e3,
            cached * 1e6,
            percentile(&first_walk, 0.5) * 1e6,
            first_walk[first_walk.len() - 1] * 1e6,
            percentile(&times, 0.5) * 1e6,
            percentile(&times, 0.99) * 1e6,
            times[n - 1] * 1e6,
            allowed as f64 / n as f64
        );
    }
    println!();
    println!(
        "Masks timed while feeding a valid document token by token, restarted until {} steps; the first walk \
         builds the lexer's states, later walks reuse them (as later requests with the same cached grammar do).",
        args.steps
    );
    Ok(())
}
