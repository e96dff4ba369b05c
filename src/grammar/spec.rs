//! What a request asks its output to match, and how each kind becomes an llguidance grammar.

use llguidance::api::TopLevelGrammar;
use serde_json::{json, Value};

use super::GrammarError;

/// The output constraint of one request.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (OpenAI `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON document valid against `schema` (OpenAI `response_format` `json_schema`, vLLM
    /// `structured_outputs.json`). With `strict`, a keyword llguidance does not support is an error; without
    /// it, such keywords are ignored.
    JsonSchema { schema: Value, strict: bool },
    /// Text matching a regular expression, anchored at both ends (vLLM `structured_outputs.regex`).
    Regex(String),
    /// Exactly one of these strings (vLLM `structured_outputs.choice`).
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax (vLLM `structured_outputs.grammar`).
    Lark(String),
}

impl GrammarSpec {
    /// The cache key: a canonical string per spec (JSON of the schema, so equal values give equal keys).
    pub(crate) fn cache_key(&self) -> String {
        let v = match self {
            Self::JsonObject => json!({ "json_object": true }),
            Self::JsonSchema { schema, strict } => json!({ "json_schema": schema, "strict": strict }),
            Self::Regex(r) => json!({ "regex": r }),
            Self::Choice(c) => json!({ "choice": c }),
            Self::Lark(l) => json!({ "lark": l }),
        };
        v.to_string()
    }

    /// A short name for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JsonObject => "json_object",
            Self::JsonSchema { .. } => "json_schema",
            Self::Regex(_) => "regex",
            Self::Choice(_) => "choice",
            Self::Lark(_) => "grammar",
        }
    }

    /// The llguidance grammar for this spec (checks only the shape; the grammar itself compiles later).
    pub(crate) fn to_llguidance(&self) -> Result<TopLevelGrammar, GrammarError> {
        Ok(match self {
            Self::JsonObject => TopLevelGrammar::from_json_schema(with_options(json!({"type": "object"}), false)?),
            Self::JsonSchema { schema, strict } => {
                TopLevelGrammar::from_json_schema(with_options(schema.clone(), *strict)?)
            }
            Self::Regex(r) => {
                if r.is_empty() {
                    return Err(GrammarError::Regex("the pattern is empty".into()));
                }
                TopLevelGrammar::from_regex(r)
            }
            Self::Choice(choices) => TopLevelGrammar::from_lark(choice_lark(choices)?),
            Self::Lark(g) => {
                if g.trim().is_empty() {
                    return Err(GrammarError::Lark("the grammar is empty".into()));
                }
                TopLevelGrammar::from_lark(g.clone())
            }
        })
    }
}

/// Puts our JSON options in the schema's `x-guidance` (replacing any the client sent): compact separators
/// and no free whitespace, so a small model cannot loop on spaces; `lenient` (ignore unsupported keywords)
/// unless strict.
fn with_options(mut schema: Value, strict: bool) -> Result<Value, GrammarError> {
    let Some(obj) = schema.as_object_mut() else {
        return Err(GrammarError::JsonSchema("the schema must be a JSON object".into()));
    };
    obj.insert(
        "x-guidance".into(),
        json!({
            "item_separator": ",",
            "key_separator": ":",
            "whitespace_flexible": false,
            "lenient": !strict,
        }),
    );
    Ok(schema)
}

/// A Lark grammar matching exactly one of `choices`, each a quoted literal.
fn choice_lark(choices: &[String]) -> Result<String, GrammarError> {
    if choices.is_empty() {
        return Err(GrammarError::Choice("the list of choices is empty".into()));
    }
    if choices.iter().any(String::is_empty) {
        return Err(GrammarError::Choice("a choice is the empty string".into()));
    }
    let alternatives: Vec<String> = choices.iter().map(|c| lark_literal(c)).collect();
    Ok(format!("start: {}\n", alternatives.join(" | ")))
}

/// A Lark string literal for `s`: JSON quoting (which Lark's string syntax accepts), plus DEL escaped, which
/// JSON leaves raw and Lark does not allow.
fn lark_literal(s: &str) -> String {
    Value::String(s.to_string()).to_string().replace('\u{7f}', "\\u007f")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_escape_quotes_backslashes_and_controls() {
        assert_eq!(lark_literal(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(lark_literal("x\ny\u{7f}"), r#""x\ny\u007f""#);
        assert_eq!(
            choice_lark(&["yes".into(), "no".into()]).expect("valid"),
            "start: \"yes\" | \"no\"\n"
        );
    }

    #[test]
    fn equal_specs_have_equal_keys() {
        let a = GrammarSpec::JsonSchema {
            schema: json!({"type": "object"}),
            strict: true,
        };
        let b = GrammarSpec::JsonSchema {
            schema: json!({"type": "object"}),
            strict: false,
        };
        assert_eq!(a.cache_key(), a.clone().cache_key());
        assert_ne!(a.cache_key(), b.cache_key());
        assert_ne!(
            GrammarSpec::Regex("a".into()).cache_key(),
            GrammarSpec::Lark("a".into()).cache_key()
        );
    }
}
