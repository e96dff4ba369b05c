//! Grammar tests against the real SmolLM2 tokenizer (read from the GGUF's metadata only).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::*;
use crate::engine::constraint::TokenMask;

fn tokenizer() -> &'static TextTokenizer {
    static T: OnceLock<TextTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        let mut f = std::io::BufReader::new(std::fs::File::open(&p).expect("run `make models` first"));
        let content = candle_core::quantized::gguf_file::Content::read(&mut f).expect("gguf");
        TextTokenizer::from_gguf(&content).expect("tokenizer")
    })
}

fn grammars() -> &'static Grammars {
    static G: OnceLock<Grammars> = OnceLock::new();
    G.get_or_init(|| Grammars::new(tokenizer(), 16).expect("grammars"))
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "ok": {"type": "boolean"}
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": false
    })
}

fn text(ids: &[u32]) -> String {
    let t = tokenizer();
    let bytes: Vec<u8> = ids.iter().flat_map(|&i| t.token_bytes(i).expect("token")).collect();
    let s = String::from_utf8(bytes).expect("utf-8");
    assert_eq!(s, t.decode(ids).expect("decode"), "token_bytes agrees with the decoder");
    s
}

/// Special tokens that are not stop ids are never allowed; stop ids come all together or not at all.
fn check_mask(mask: &TokenMask) -> bool {
    let t = tokenizer();
    let stops: Vec<bool> = t.stop_ids.iter().map(|&s| mask.allows(s)).collect();
    assert!(stops.iter().all(|&a| a == stops[0]), "all stop ids or none");
    for id in 0..t.vocab_size() as u32 {
        if t.is_special(id) && !t.is_stop(id) {
            assert!(!mask.allows(id), "special token {id} allowed");
        }
    }
    stops[0]
}

/// Samples allowed tokens at random until the grammar is finished or a stop id is chosen (a third of the time
/// when allowed); `on_stop_allowed` sees the text whenever a stop id is allowed. Returns the text.
fn drive(c: &mut dyn Constraint, seed: u64, mut on_stop_allowed: impl FnMut(&str)) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids = Vec::new();
    for _ in 0..500 {
        if c.is_finished() {
            let mask = c.mask().expect("mask");
            assert!(
                check_mask(&mask) && mask.count() == tokenizer().stop_ids.len(),
                "finished: only stops"
            );
            return text(&ids);
        }
        let mask = c.mask().expect("mask");
        if check_mask(&mask) {
            on_stop_allowed(&text(&ids));
            if rng.random_bool(1.0 / 3.0) {
                return text(&ids);
            }
        }
        let allowed: Vec<u32> = (0..tokenizer().vocab_size() as u32)
            .filter(|&i| mask.allows(i) && !tokenizer().is_stop(i))
            .collect();
        if allowed.is_empty() {
            return text(&ids);
        }
        let tok = allowed[rng.random_range(0..allowed.len())];
        c.commit(tok).expect("commit");
        ids.push(tok);
    }
    panic!("no end after 500 tokens: {:?}", text(&ids));
}

fn check_person(v: &Value) {
    let o = v.as_object().expect("an object");
    assert!(
        o.keys().all(|k| ["name", "age", "tags", "ok"].contains(&k.as_str())),
        "{v}"
    );
    assert!(o["name"].as_str().expect("name").chars().count() <= 8, "{v}");
    assert!(o["age"].as_u64().expect("age") <= 150, "{v}");
    assert!(o["ok"].is_boolean(), "{v}");
    if let Some(tags) = o.get("tags") {
        let tags = tags.as_array().expect("tags");
        assert!(tags.len() <= 3 && tags.iter().all(|t| ["a", "b", "c"].contains(&t.as_str().unwrap_or(""))));
    }
}

#[test]
fn random_walks_through_a_schema_give_valid_json() {
    let spec = GrammarSpec::JsonSchema {
        schema: person_schema(),
        strict: true,
    };
    let compiled = grammars().compile(&spec).expect("compiles");
    for seed in 0..12 {
        let mut c = compiled.start().expect("start");
        let out = drive(c.as_mut(), seed, |so_far| {
            // A stop id is allowed only where the text is a complete, valid document.
            check_person(&serde_json::from_str(so_far).expect("stop allowed only after valid JSON"));
        });
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out:?}: {e}"));
        check_person(&v);
        assert!(!out.contains(": ") && !out.contains(", "), "compact: {out}");
    }
}

#[test]
fn json_object_allows_stop_only_after_the_closing_brace() {
    let compiled = grammars().compile(&GrammarSpec::JsonObject).expect("compiles");
    let mut c = compiled.start().expect("start");
    let first = c.mask().expect("mask");
    assert!(!check_mask(&first), "no stop before anything");
    assert!(
        !first.allows(tokenizer().encode(" ").expect("enc")[0]),
        "no leading whitespace"
    );
    let ids = tokenizer().encode(r#"{"a":[1,"x"]}"#).expect("encode");
    for (i, &t) in ids.iter().enumerate() {
        assert!(
            !check_mask(&c.mask().expect("mask")),
            "no stop inside, before token {i}"
        );
        c.commit(t).expect("valid token");
    }
    assert!(c.is_finished());
    let end = c.mask().expect("mask");
    assert!(check_mask(&end));
    assert_eq!(end.count(), tokenizer().stop_ids.len());
}

#[test]
fn every_stop_id_is_allowed_where_the_grammar_may_end() {
    // SmolLM2's eos is <|im_end|> itself; give it a second stop id as other models have.
    let mut t = tokenizer().clone();
    let endoftext = (0..t.vocab_size() as u32)
        .find(|&i| t.token_text(i) == Some("<|endoftext|>"))
        .expect("token");
    t.stop_ids.push(endoftext);
    t.stop_ids.sort_unstable();
    let g = Grammars::new(&t, 1).expect("grammars");
    let mut c = g
        .compile(&GrammarSpec::Choice(vec!["ab".into(), "abc".into()]))
        .expect("compiles")
        .start()
        .expect("start");
    let stops = |m: &TokenMask| t.stop_ids.iter().filter(|&&s| m.allows(s)).count();
    assert_eq!(stops(&c.mask().expect("mask")), 0);
    for id in t.encode("ab").expect("encode") {
        c.commit(id).expect("commit");
    }
    let m = c.mask().expect("mask");
    assert_eq!(stops(&m), 2, "both stop ids where the text may end");
    assert!(m.allows(t.encode("c").expect("encode")[0]) && !c.is_finished());
    c.commit(t.encode("c").expect("encode")[0]).expect("commit");
    assert!(c.is_finished());
    assert_eq!(c.mask().expect("mask").count(), 2);
}

#[test]
fn a_disallowed_token_is_an_error_not_a_panic() {
    let compiled = grammars().compile(&GrammarSpec::JsonObject).expect("compiles");
    let mut c = compiled.start().expect("start");
    let x = tokenizer().encode("x").expect("encode")[0];
    assert!(!c.mask().expect("mask").allows(x));
    assert!(c.commit(x).is_err());
    assert!(!c.is_finished());
    assert!(c.mask().is_err());
}

#[test]
fn regex_output_matches() {
    let compiled = grammars()
        .compile(&GrammarSpec::Regex(r"[a-c]{2,4}-[0-9]{3}".into()))
        .expect("compiles");
    for seed in 0..8 {
        let out = drive(compiled.start().expect("start").as_mut(), seed, |_| {});
        let (l, r) = out.split_once('-').unwrap_or_else(|| panic!("{out:?}"));
        assert!(
            (2..=4).contains(&l.len()) && l.chars().all(|ch| ('a'..='c').contains(&ch)),
            "{out:?}"
        );
        assert!(r.len() == 3 && r.chars().all(|ch| ch.is_ascii_digit()), "{out:?}");
    }
}

#[test]
fn choice_output_is_one_of_the_choices() {
    let choices: Vec<String> = ["red", "redder", "green", r#"say "hi" \ bye"#, "naïve"]
        .map(String::from)
        .to_vec();
    let compiled = grammars()
        .compile(&GrammarSpec::Choice(choices.clone()))
        .expect("compiles");
    let mut seen = std::collections::HashSet::new();
    for seed in 0..30 {
        let out = drive(compiled.start().expect("start").as_mut(), seed, |so_far| {
            assert!(choices.iter().any(|c| c == so_far), "stop allowed after {so_far:?}");
        });
        assert!(choices.contains(&out), "{out:?}");
        seen.insert(out);
    }
    assert!(seen.len() >= 3, "{seen:?}");
}

#[test]
fn lark_grammar_works() {
    let g = "start: greeting \" \" name\ngreeting: \"hi\" | \"hello\"\nname: /[A-Z][a-z]{1,5}/\n";
    let compiled = grammars().compile(&GrammarSpec::Lark(g.into())).expect("compiles");
    for seed in 0..5 {
        let out = drive(compiled.start().expect("start").as_mut(), seed, |_| {});
        let (greet, name) = out.split_once(' ').unwrap_or_else(|| panic!("{out:?}"));
        assert!(greet == "hi" || greet == "hello", "{out:?}");
        assert!(
            (2..=6).contains(&name.len()) && name.starts_with(|c: char| c.is_ascii_uppercase()),
            "{out:?}"
        );
    }
}

#[test]
fn bad_specs_give_clear_errors() {
    let cases = [
        (
            GrammarSpec::JsonSchema {
                schema: json!({"type": "frobnicate"}),
                strict: true,
            },
            "invalid JSON schema: ",
        ),
        (
            GrammarSpec::JsonSchema {
                schema: json!(42),
                strict: false,
            },
            "invalid JSON schema: ",
        ),
        (
            GrammarSpec::JsonSchema {
                schema: json!({"$ref": "#/$defs/missing"}),
                strict: true,
            },
            "invalid JSON schema: ",
        ),
        (
            GrammarSpec::JsonSchema {
                schema: json!({"type": "integer", "minimum": 5, "maximum": 1}),
                strict: true,
            },
            "invalid JSON schema: ",
        ),
        (GrammarSpec::Regex("(".into()), "invalid regex: "),
        (GrammarSpec::Regex("[z-a]".into()), "invalid regex: "),
        (GrammarSpec::Regex(String::new()), "invalid regex: "),
        (GrammarSpec::Choice(vec![]), "invalid choice: "),
        (GrammarSpec::Choice(vec!["a".into(), String::new()]), "invalid choice: "),
        (GrammarSpec::Lark("start: missing_rule".into()), "invalid grammar: "),
        (GrammarSpec::Lark("start: \"a".into()), "invalid grammar: "),
        (GrammarSpec::Lark("start: /[/".into()), "invalid grammar: "),
        (GrammarSpec::Lark("  ".into()), "invalid grammar: "),
    ];
    for (spec, prefix) in cases {
        let err = grammars().compile(&spec).expect_err(&format!("{spec:?} must fail"));
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(
            msg.starts_with(prefix) && msg.len() > prefix.len() + 3,
            "{spec:?}: {msg}"
        );
        assert!(msg.chars().count() <= MAX_ERROR_CHARS + 40, "{msg}");
    }
}

#[test]
fn unsupported_keywords_fail_only_when_strict() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}});
    let strict = grammars().compile(&GrammarSpec::JsonSchema {
        schema: schema.clone(),
        strict: true,
    });
    assert!(strict.is_err_and(|e| e.to_string().starts_with("invalid JSON schema: ")));
    grammars()
        .compile(&GrammarSpec::JsonSchema { schema, strict: false })
        .expect("lenient ignores it");
}

#[test]
fn pathological_specs_error_rather_than_hang() {
    // The n-th-from-last-letter language: its DFA has 2^n states, built lazily while masking.
    for rx in [
        "[ab]*a[ab]{40}",
        "(a|b|c|d|e)*x(a|b|c|d|e){100}{100}",
        "((((a{1,50}){1,50}){1,50}){1,50})b",
    ] {
        let t0 = Instant::now();
        let r = grammars().compile(&GrammarSpec::Regex(rx.into()));
        let mut steps = 0;
        let mut err = None;
        if let Ok(c) = &r {
            let mut c = c.start().expect("start");
            let mut rng = StdRng::seed_from_u64(1);
            while steps < 200 && !c.is_finished() {
                match c.mask() {
                    Ok(m) => {
                        let ids: Vec<u32> = (0..tokenizer().vocab_size() as u32)
                            .filter(|&i| m.allows(i) && !tokenizer().is_stop(i))
                            .collect();
                        if ids.is_empty() {
                            break;
                        }
                        c.commit(ids[rng.random_range(0..ids.len())]).expect("commit");
                    }
                    Err(e) => {
                        err = Some(e.to_string());
                        break;
                    }
                }
                steps += 1;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "pathological {rx}: {secs:.3}s compile={:?} steps={steps} err={err:?}",
            r.as_ref().map(|_| ())
        );
        assert!(secs < 20.0, "{rx} took {secs}s");
        if rx.ends_with(")b") {
            let err = err.expect("exhausts the lexer's budget");
            assert!(
                err.starts_with("constrained decoding failed: ") && !err.contains("non-verbose"),
                "{err}"
            );
        }
    }
}

#[test]
fn cache_returns_the_same_compilation_and_is_bounded() {
    let g = Grammars::new(tokenizer(), 2).expect("grammars");
    let a = GrammarSpec::Regex("a+".into());
    let (first, info) = g.compile_traced(&a).expect("compiles");
    assert!(!info.cached);
    let (again, info) = g.compile_traced(&a).expect("compiles");
    assert!(info.cached && Arc::ptr_eq(&first, &again));
    g.compile(&GrammarSpec::Regex("b+".into())).expect("compiles");
    g.compile(&GrammarSpec::Regex("c+".into())).expect("compiles");
    assert_eq!(g.cached(), 2);
    let evicted = g.compile(&a).expect("compiles");
    assert!(!Arc::ptr_eq(&first, &evicted));
    assert_eq!(g.cache_counts(), (1, 4));
    assert!(g.compile(&GrammarSpec::Regex("(".into())).is_err());
    assert_eq!(g.cached(), 2, "errors are not cached");
}

#[test]
fn forks_are_independent() {
    let spec = GrammarSpec::JsonSchema {
        schema: person_schema(),
        strict: true,
    };
    let compiled = grammars().compile(&spec).expect("compiles");
    let mut a = compiled.start().expect("start");
    for t in tokenizer().encode(r#"{"name":"Al"#).expect("encode") {
        a.commit(t).expect("commit");
    }
    let before = a.mask().expect("mask");
    let mut b = a.fork();
    assert_eq!(b.mask().expect("mask"), before);
    for t in tokenizer().encode(r#"","age":7,"ok":true}"#).expect("encode") {
        b.commit(t).expect("commit");
    }
    assert!(b.is_finished() && !a.is_finished());
    assert_eq!(
        a.mask().expect("mask"),
        before,
        "the fork's tokens did not touch the original"
    );
    for t in tokenizer().encode(r#"ice","age":150,"ok":false}"#).expect("encode") {
        a.commit(t).expect("commit");
    }
    assert!(a.is_finished());
    // Two starts are independent too.
    let mut c = compiled.start().expect("start");
    assert!(!c.is_finished() && !check_mask(&c.mask().expect("mask")));
}
