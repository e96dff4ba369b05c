//! Chat prompt rendering from the model's Jinja template (`tokenizer.chat_template`), with minijinja.
//!
//! Rendered like Hugging Face's `apply_chat_template`: `trim_blocks` and `lstrip_blocks` on, Python string
//! methods available (`.strip()`, `.startswith()`...), `raise_exception` for templates that validate roles.
//! A GGUF without a template (Gemma 3's base model, say) has none: chat requests are refused unless the server
//! is started with `--chat-template`, naming `chatml` (built in) or a Jinja file ([`ChatTemplate::from_spec`]).
//! The template comes with the model file, so it is bounded like input: a render that runs past
//! [`MAX_RENDER_FUEL`] template instructions (nested loops over `range`, say) fails instead of hanging.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;

use super::ModelError;

/// ChatML, the format SmolLM2 and many small models use: `--chat-template chatml`.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Template instructions one render may execute. Real templates spend a couple of dozen per message (measured:
/// ChatML 19, SmolLM2's 23), so this admits 2 million messages, more than a 16 MiB request body holds (about
/// 560,000), and stops a runaway template in about a second (1.2 s for nested `range` loops on a busy core).
pub const MAX_RENDER_FUEL: u64 = 50_000_000;

/// One chat message, already reduced to plain text content.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

fn raise_exception(msg: String) -> Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// The template `--chat-template` names: `chatml`, or the path of a Jinja file.
    pub fn from_spec(spec: &str, bos_token: &str, eos_token: &str) -> Result<Self, ModelError> {
        if spec == "chatml" {
            return Self::new(CHATML_TEMPLATE, bos_token, eos_token);
        }
        let source = std::fs::read_to_string(spec).map_err(|e| {
            ModelError::Template(format!(
                "--chat-template {spec}: neither 'chatml' nor a readable file: {e}"
            ))
        })?;
        Self::new(&source, bos_token, eos_token)
    }

    /// Compiles `source`. `bos_token` / `eos_token` are exposed to the template.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(MAX_RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::Template(format!("chat template does not compile: {e}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders the prompt for `messages`; `add_generation_prompt` opens the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ModelError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| ModelError::Template(format!("chat template failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_generation_prompt() {
        let t = ChatTemplate::from_spec("chatml", "", "").expect("compiles");
        let msgs = [ChatMessage {
            role: "user".into(),
            content: "Hi".into(),
        }];
        assert_eq!(
            t.render(&msgs, true).expect("renders"),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    /// The largest conversation a request body can hold (16 MiB of `{"role":"user","content":""}`, about
    /// 560,000 messages) renders within the fuel.
    #[test]
    fn the_fuel_admits_any_conversation_a_request_can_carry() {
        let t = ChatTemplate::new(CHATML_TEMPLATE, "", "").expect("compiles");
        let msgs = vec![
            ChatMessage {
                role: "user".into(),
                content: String::new(),
            };
            (16 << 20) / 30
        ];
        t.render(&msgs, true).expect("renders within the fuel");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('no') }}", "", "").expect("compiles");
        let err = t.render(&[], false).expect_err("raises");
        assert!(err.to_string().contains("no"), "{err}");
    }

    #[test]
    fn a_spec_that_is_neither_chatml_nor_a_file_is_a_clear_error() {
        let err = ChatTemplate::from_spec("/no/such/template.jinja", "", "").expect_err("no file");
        assert!(
            err.to_string().contains("--chat-template /no/such/template.jinja"),
            "{err}"
        );
    }
}
