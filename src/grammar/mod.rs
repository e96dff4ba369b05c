//! TEMPORARY local stand-in (not committed) until the llguidance module lands.
use std::sync::Arc;

use crate::engine::constraint::Constraint;

#[derive(Debug, Clone)]
pub enum GrammarSpec {
    JsonObject,
    JsonSchema { schema: serde_json::Value, strict: bool },
    Regex(String),
    Choice(Vec<String>),
    Lark(String),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GrammarError(pub String);

pub struct Grammars;
pub struct Compiled;

impl Grammars {
    pub fn new(_t: &crate::model::TextTokenizer, _c: usize) -> Result<Self, GrammarError> {
        Ok(Self)
    }
    pub fn compile(&self, _s: &GrammarSpec) -> Result<Arc<Compiled>, GrammarError> {
        Err(GrammarError("not yet".into()))
    }
}
impl Compiled {
    pub fn start(&self) -> Result<Box<dyn Constraint>, GrammarError> {
        Err(GrammarError("not yet".into()))
    }
}
