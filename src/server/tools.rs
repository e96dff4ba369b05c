//! Tool (function) calling: the request's `tools` and `tool_choice`, the prompt that offers the tools, the
//! grammar that shapes a call, and the parsing of calls out of the output.
//!
//! Calls are written in the Hermes format that Qwen 2.5/3, Hermes and SmolLM3 models are trained on:
//! `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call. Templates that render `tools`
//! themselves get them; for a template without tool support (SmolLM2's) a system message lists the functions
//! and this format, assistant turns with `tool_calls` are written back in it and `tool` results are given as
//! user turns holding `<tool_response>...</tool_response>`.
//!
//! Every call is constrained by a grammar built from the functions' parameter schemas, so its arguments always
//! parse and validate: `required` and a named function must call; `auto` lets the model choose between plain
//! text (which then may not start with `<`) and calls. The choice stays the model's, as with llama.cpp and
//! mistral.rs parsing native formats, but a call once begun cannot be malformed (TGI forces JSON for every
//! answer instead, which makes a small model's plain answers worse).

use serde_json::{json, Value};

use super::error::ApiError;
use crate::grammar::GrammarSpec;

/// Opens a call in the output.
pub const CALL_OPEN: &str = "<tool_call>";
/// Closes a call.
pub const CALL_CLOSE: &str = "</tool_call>";

/// One offered function.
#[derive(Debug, Clone)]
pub struct Function {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments object.
    pub parameters: Value,
}

/// What `tool_choice` asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// The checked tool fields of a chat request.
#[derive(Debug, Clone)]
pub struct Tools {
    pub functions: Vec<Function>,
    pub choice: Choice,
    pub parallel: bool,
}

fn bad(param: &str, m: impl Into<String>) -> ApiError {
    ApiError::invalid_param(param, m.into())
}

impl Tools {
    /// Parses `tools`, `tool_choice` and `parallel_tool_calls`; None when no tool may be called.
    pub fn parse(
        tools: Option<&Value>,
        choice: Option<&Value>,
        parallel: Option<&Value>,
    ) -> Result<Option<Self>, ApiError> {
        let list = match tools {
            None | Some(Value::Null) => &Vec::new(),
            Some(Value::Array(a)) => a,
            Some(_) => {
                return Err(bad(
                    "tools",
                    "tools must be a list of {\"type\": \"function\", \"function\": {...}}",
                ))
            }
        };
        let mut functions: Vec<Function> = Vec::with_capacity(list.len());
        for (i, t) in list.iter().enumerate() {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad("tools", format!("tools[{i}].type must be \"function\"")));
            }
            let f = t
                .get("function")
                .filter(|f| f.is_object())
                .ok_or_else(|| bad("tools", format!("tools[{i}].function must be an object")))?;
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            let valid = !name.is_empty()
                && name.len() <= 64
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                return Err(bad(
                    "tools",
                    format!("tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'"),
                ));
            }
            if functions.iter().any(|g| g.name == name) {
                return Err(bad("tools", format!("two tools are named '{name}'")));
            }
            if f.get("strict").is_some_and(|s| !s.is_null() && !s.is_boolean()) {
                return Err(bad("tools", format!("tools[{i}].function.strict must be a boolean")));
            }
            if f.get("description").is_some_and(|d| !d.is_string()) {
                return Err(bad(
                    "tools",
                    format!("tools[{i}].function.description must be a string"),
                ));
            }
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}, "additionalProperties": false}),
                Some(p) if p.is_object() => p.clone(),
                Some(_) => {
                    return Err(bad(
                        "tools",
                        format!("tools[{i}].function.parameters must be a JSON Schema object"),
                    ))
                }
            };
            functions.push(Function {
                name: name.to_string(),
                description: f.get("description").and_then(Value::as_str).map(str::to_string),
                parameters,
            });
        }
        let choice = match choice {
            None | Some(Value::Null) if functions.is_empty() => Choice::None,
            None | Some(Value::Null) => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => Choice::None,
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => {
                    return Err(bad(
                        "tool_choice",
                        format!("tool_choice '{other}' is not one of none, auto, required or a named function"),
                    ))
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| {
                        bad(
                            "tool_choice",
                            "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        )
                    })?;
                if !functions.iter().any(|f| f.name == name) {
                    return Err(bad(
                        "tool_choice",
                        format!("tool_choice names '{name}', which is not in tools"),
                    ));
                }
                Choice::Named(name.to_string())
            }
        };
        if functions.is_empty() && choice != Choice::None {
            return Err(bad("tool_choice", "tool_choice asks for a call but no tools are given"));
        }
        let parallel = match parallel {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("parallel_tool_calls", "parallel_tool_calls must be a boolean")),
        };
        Ok((choice != Choice::None).then_some(Self {
            functions,
            choice,
            parallel,
        }))
    }

    /// The functions a call may name.
    fn callable(&self) -> impl Iterator<Item = &Function> {
        self.functions
            .iter()
            .filter(|f| !matches!(&self.choice, Choice::Named(n) if *n != f.name))
    }

    /// The grammar of the output: calls only (`required`, named), or text or calls (`auto`).
    pub fn grammar(&self) -> GrammarSpec {
        let calls: Vec<Value> = self
            .callable()
            .map(|f| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        // Compact JSON as for response_format (no free whitespace for a small model to loop on); lenient, as
        // clients' parameter schemas carry keywords no grammar enforces.
        let call_schema = json!({
            "anyOf": calls,
            "x-guidance": {"item_separator": ",", "key_separator": ":", "whitespace_flexible": false, "lenient": true},
        });
        let calls_rule = if self.parallel { "call (\"\\n\" call)*" } else { "call" };
        let start = match self.choice {
            Choice::Auto => "start: TEXT | calls",
            _ => "start: calls",
        };
        GrammarSpec::Lark(format!(
            "{start}\ncalls: {calls_rule}\ncall: \"{CALL_OPEN}\" json_call \"{CALL_CLOSE}\"\njson_call: %json {call_schema}\nTEXT: /[^<][\\s\\S]*/\n"
        ))
    }

    /// The system text that offers the functions to a template without tool support.
    pub fn system_prompt(&self) -> String {
        let listed: Vec<Value> = self
            .callable()
            .map(|f| {
                let mut v = json!({"name": f.name, "parameters": f.parameters});
                if let Some(d) = &f.description {
                    v["description"] = json!(d);
                }
                v
            })
            .collect();
        let must = match self.choice {
            Choice::Auto => "If a function helps answer, call it; otherwise answer in plain text.",
            _ => "Answer by calling a function.",
        };
        format!(
            "You can call these functions:\n{}\n{must} To call a function, write {CALL_OPEN}{{\"name\": <function name>, \"arguments\": <arguments object>}}{CALL_CLOSE}.",
            listed.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
        )
    }
}

/// A call found in the output.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    /// The arguments object, serialized.
    pub arguments: String,
}

/// The text before the first call (trimmed; None when empty) and the calls in `output`, in order; no calls
/// when the output holds no complete, well-formed block.
pub fn parse_calls(output: &str) -> (Option<String>, Vec<Call>) {
    let Some(first) = output.find(CALL_OPEN) else {
        return (Some(output.to_string()), Vec::new());
    };
    let mut calls = Vec::new();
    let mut rest = &output[first..];
    while let Some(start) = rest.find(CALL_OPEN) {
        let body = &rest[start + CALL_OPEN.len()..];
        let Some(end) = body.find(CALL_CLOSE) else { break };
        if let Ok(v) = serde_json::from_str::<Value>(&body[..end]) {
            if let (Some(name), Some(args)) = (v.get("name").and_then(Value::as_str), v.get("arguments")) {
                calls.push(Call {
                    name: name.to_string(),
                    arguments: args.to_string(),
                });
            }
        }
        rest = &body[end + CALL_CLOSE.len()..];
    }
    if calls.is_empty() {
        return (Some(output.to_string()), calls);
    }
    let text = output[..first].trim();
    ((!text.is_empty()).then(|| text.to_string()), calls)
}

/// A call written back into a prompt in the Hermes format.
pub fn render_call(name: &str, arguments: &str) -> String {
    let args: Value = serde_json::from_str(arguments).unwrap_or_else(|_| Value::String(arguments.to_string()));
    format!(
        "{CALL_OPEN}{{\"name\": {}, \"arguments\": {args}}}{CALL_CLOSE}",
        Value::from(name)
    )
}

/// A tool's result as a user turn's content.
pub fn render_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Value {
        json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "now"}}
        ])
    }

    #[test]
    fn choices_parse_and_bad_ones_name_the_field() {
        let t = Tools::parse(Some(&tools()), None, None).expect("ok").expect("auto");
        assert_eq!(
            (t.choice.clone(), t.parallel, t.functions.len()),
            (Choice::Auto, true, 2)
        );
        assert!(Tools::parse(Some(&tools()), Some(&json!("none")), None)
            .expect("ok")
            .is_none());
        assert!(Tools::parse(None, None, None).expect("ok").is_none());
        let named = json!({"type": "function", "function": {"name": "now"}});
        let t = Tools::parse(Some(&tools()), Some(&named), Some(&json!(false)))
            .expect("ok")
            .expect("named");
        assert_eq!((t.choice.clone(), t.parallel), (Choice::Named("now".into()), false));
        assert_eq!(t.callable().count(), 1);
        for (tools_v, choice, param) in [
            (json!([{"type": "code"}]), json!("auto"), "tools"),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                json!("auto"),
                "tools",
            ),
            (tools(), json!("sometimes"), "tool_choice"),
            (
                tools(),
                json!({"type": "function", "function": {"name": "nope"}}),
                "tool_choice",
            ),
            (json!([]), json!("required"), "tool_choice"),
        ] {
            let e = Tools::parse(Some(&tools_v), Some(&choice), None).expect_err("refused");
            assert_eq!(e.param.as_deref(), Some(param), "{tools_v} {choice}");
        }
    }

    #[test]
    fn calls_are_parsed_out_of_the_output() {
        let out = "Let me check.\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>\n<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>";
        let (text, calls) = parse_calls(out);
        assert_eq!(text.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].arguments, "{\"city\":\"Paris\"}");
        assert_eq!(parse_calls("plain").1, vec![]);
        assert_eq!(
            parse_calls("<tool_call>{broken").0.as_deref(),
            Some("<tool_call>{broken")
        );
        assert_eq!(parse_calls(&render_call("now", "{}")).1[0].name, "now");
    }
}
