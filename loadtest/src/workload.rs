//! The requests to send: seeded synthetic prompts or prompts from a JSONL file.
//!
//! Request `i` depends only on the seed and `i`, so every load level and both endpoints of a comparison get
//! the same requests in the same order, and two runs with one seed send the same thing. No network here.

use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::cli::PromptSource;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A prompt as text or as chat messages; each client turns it into its API's shape.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Chat(Vec<Message>),
}

impl Prompt {
    /// As chat messages (a text prompt becomes one user message).
    pub fn messages(&self) -> Vec<Message> {
        match self {
            Prompt::Text(t) => vec![Message {
                role: "user".into(),
                content: t.clone(),
            }],
            Prompt::Chat(m) => m.clone(),
        }
    }

    /// As one text (chat contents joined by newlines).
    pub fn text(&self) -> String {
        match self {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(m) => m.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"),
        }
    }
}

/// What one request asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    pub prompt: Prompt,
    pub max_tokens: u32,
}

/// A prompt file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Line { path: String, line: usize, message: String },
    #[error("{0} has no prompts")]
    Empty(String),
}

/// One JSONL line: a bare string, or an object with `prompt` or `messages`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Line {
    Text(String),
    Object {
        prompt: Option<String>,
        messages: Option<Vec<Message>>,
        max_tokens: Option<u32>,
    },
}

/// Common English words, most of them one token in BPE vocabularies of LLMs (with their leading space).
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "for", "that", "with", "as", "on", "by", "at", "from", "his", "her",
    "they", "this", "which", "are", "be", "had", "not", "have", "one", "their", "first", "new", "after", "who", "also",
    "time", "two", "all", "into", "more", "other", "year", "when", "city", "world", "school", "state", "people",
    "water", "house", "river", "music", "field", "light", "story", "game", "power", "land", "team", "book", "road",
    "war", "life", "family", "church", "north", "south", "small", "large", "old", "great", "long", "high", "early",
    "last", "made", "known", "found", "used", "called", "began", "second", "part", "name", "place", "area", "group",
    "line", "club", "town", "home", "film", "night", "day", "work", "number", "system", "point", "public", "king",
    "market", "tree", "stone", "bridge", "garden", "sea",
];

/// The requests of a run.
#[derive(Debug, Clone)]
pub struct Workload {
    source: Source,
    max_tokens: u32,
    seed: u64,
}

#[derive(Debug, Clone)]
enum Source {
    Synthetic { words: usize },
    File(Vec<RequestSpec>),
}

impl Workload {
    /// Builds the workload; reads and checks the whole prompt file up front.
    pub fn new(prompts: &PromptSource, max_tokens: u32, seed: u64) -> Result<Self, WorkloadError> {
        let source = match prompts {
            PromptSource::Synthetic { tokens } => Source::Synthetic {
                words: (*tokens).max(1),
            },
            PromptSource::File { path } => Source::File(read_file(path, max_tokens)?),
        };
        Ok(Workload {
            source,
            max_tokens,
            seed,
        })
    }

    /// Request number `index` (any u64; a file cycles).
    pub fn request(&self, index: u64) -> RequestSpec {
        match &self.source {
            Source::File(items) => items[(index % items.len() as u64) as usize].clone(),
            Source::Synthetic { words } => {
                let mut rng = StdRng::seed_from_u64(mix(self.seed, index));
                let text: Vec<&str> = (0..*words).filter_map(|_| WORDS.choose(&mut rng).copied()).collect();
                RequestSpec {
                    prompt: Prompt::Text(text.join(" ")),
                    max_tokens: self.max_tokens,
                }
            }
        }
    }
}

/// A well-spread per-request seed (splitmix64 of seed and index).
pub(crate) fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed
        ^ index
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn read_file(path: &Path, max_tokens: u32) -> Result<Vec<RequestSpec>, WorkloadError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Read {
        path: name.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let bad = |message: String| WorkloadError::Line {
            path: name.clone(),
            line: i + 1,
            message,
        };
        let line: Line = serde_json::from_str(raw)
            .map_err(|e| bad(format!("{e} (expected a string or an object with prompt or messages)")))?;
        out.push(match line {
            Line::Text(t) => RequestSpec {
                prompt: Prompt::Text(t),
                max_tokens,
            },
            Line::Object {
                prompt,
                messages,
                max_tokens: m,
            } => {
                let prompt = match (prompt, messages) {
                    (Some(p), None) => Prompt::Text(p),
                    (None, Some(m)) if !m.is_empty() => Prompt::Chat(m),
                    _ => return Err(bad("needs exactly one of a prompt or non-empty messages".into())),
                };
                RequestSpec {
                    prompt,
                    max_tokens: m.unwrap_or(max_tokens),
                }
            }
        });
    }
    if out.is_empty() {
        return Err(WorkloadError::Empty(name));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn synthetic_is_seeded_and_sized() {
        let w = Workload::new(&PromptSource::Synthetic { tokens: 40 }, 8, 7).unwrap();
        let again = Workload::new(&PromptSource::Synthetic { tokens: 40 }, 8, 7).unwrap();
        let other = Workload::new(&PromptSource::Synthetic { tokens: 40 }, 8, 8).unwrap();
        assert_eq!(w.request(3), again.request(3));
        assert_ne!(w.request(3), w.request(4));
        assert_ne!(w.request(3), other.request(3));
        assert_eq!(w.request(0).prompt.text().split(' ').count(), 40);
        assert_eq!(w.request(0).max_tokens, 8);
    }

    #[test]
    fn jsonl_lines_of_each_shape() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "\"plain\"").unwrap();
        writeln!(f).unwrap();
        writeln!(f, "{{\"prompt\": \"p\", \"max_tokens\": 3}}").unwrap();
        writeln!(f, "{{\"messages\": [{{\"role\": \"system\", \"content\": \"s\"}}, {{\"role\": \"user\", \"content\": \"u\"}}]}}").unwrap();
        let w = Workload::new(&PromptSource::File { path: f.path().into() }, 9, 0).unwrap();
        assert_eq!(w.request(0).prompt, Prompt::Text("plain".into()));
        assert_eq!(w.request(1).max_tokens, 3);
        assert_eq!(w.request(2).prompt.text(), "s\nu");
        assert_eq!(w.request(2).max_tokens, 9);
        assert_eq!(w.request(3), w.request(0));
    }

    #[test]
    fn bad_lines_name_their_number() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "\"ok\"\n{{\"nothing\": 1}}").unwrap();
        let e = Workload::new(&PromptSource::File { path: f.path().into() }, 9, 0).unwrap_err();
        assert!(e.to_string().contains(":2:"), "{e}");
    }
}
