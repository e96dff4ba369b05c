//! The soak's traffic mix: which requests stream, which hang up mid-stream, which are bad on purpose, and the
//! answer each bad one must get.
//!
//! Request `i`'s kind depends only on the seed and `i`, like its prompt. Pure: the bodies come from the
//! client's own body builder and are spoiled here; nothing is sent from this module.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

use crate::cli::SoakConfig;
use crate::client::{Client, RawRequest};
use crate::workload::{mix, RequestSpec};

/// Keeps the kind draws independent of the prompt draws made from the same seed and index.
const SALT: u64 = 0x50A4_7EA5_0A4B_AD00;

/// What one soak request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Streamed, read to `[DONE]`.
    Stream,
    /// Not streamed, read as one JSON answer.
    Plain,
    /// Streamed; the client closes the connection after a few text chunks.
    Disconnect,
    /// Bad on purpose; must be refused with [`Bad::expected_status`].
    Bad(Bad),
}

/// The ways a request is bad. Each spoils an otherwise valid, non-streamed body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bad {
    /// The body cut in half: not JSON.
    MalformedJson,
    /// `temperature` 7.5 (OpenAI's range is 0 to 2).
    OutOfRange,
    /// A top-level field no OpenAI schema has.
    UnknownField,
    /// `max_tokens` of a billion, beyond any context window.
    OversizedMaxTokens,
}

impl Bad {
    pub const ALL: [Bad; 4] = [
        Bad::MalformedJson,
        Bad::OutOfRange,
        Bad::UnknownField,
        Bad::OversizedMaxTokens,
    ];

    /// The status a correct OpenAI-compatible server answers (OpenAI's own is 400 for each).
    pub fn expected_status(self) -> u16 {
        400
    }

    /// `valid` spoiled this way, serialized.
    pub fn spoil(self, valid: &Value) -> String {
        let mut body = valid.clone();
        match self {
            Bad::MalformedJson => {
                let text = body.to_string();
                let mut cut = text.len() / 2;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                return text[..cut].to_string();
            }
            Bad::OutOfRange => body["temperature"] = json!(7.5),
            Bad::UnknownField => body["soak_unknown_field"] = json!(true),
            Bad::OversizedMaxTokens => body["max_tokens"] = json!(1_000_000_000u64),
        }
        body.to_string()
    }
}

/// The mix of one soak run.
#[derive(Debug, Clone)]
pub struct Mix {
    stream_fraction: f64,
    disconnect_fraction: f64,
    disconnect_after: u64,
    bad_fraction: f64,
    seed: u64,
}

impl Mix {
    pub fn new(soak: &SoakConfig, seed: u64) -> Self {
        Mix {
            stream_fraction: soak.stream_fraction,
            disconnect_fraction: soak.disconnect_fraction,
            disconnect_after: soak.disconnect_after,
            bad_fraction: soak.bad_fraction,
            seed,
        }
    }

    /// The kind of request `index`: bad with the bad fraction, disconnecting with the disconnect fraction,
    /// else streamed with the stream fraction.
    pub fn kind(&self, index: u64) -> Kind {
        let mut rng = StdRng::seed_from_u64(mix(self.seed ^ SALT, index));
        let u: f64 = rng.random();
        if u < self.bad_fraction {
            Kind::Bad(Bad::ALL[rng.random_range(0..Bad::ALL.len())])
        } else if u < self.bad_fraction + self.disconnect_fraction {
            Kind::Disconnect
        } else if rng.random::<f64>() < self.stream_fraction {
            Kind::Stream
        } else {
            Kind::Plain
        }
    }

    /// The request to send for `spec` as `kind`.
    pub fn request(&self, client: &Client, spec: &RequestSpec, kind: Kind) -> RawRequest {
        let stream = matches!(kind, Kind::Stream | Kind::Disconnect);
        let valid = client.body(spec, stream);
        RawRequest {
            body: match kind {
                Kind::Bad(bad) => bad.spoil(&valid),
                _ => valid.to_string(),
            },
            stream,
            disconnect_after: (kind == Kind::Disconnect).then_some(self.disconnect_after),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix_of(stream: f64, disconnect: f64, bad: f64) -> Mix {
        Mix {
            stream_fraction: stream,
            disconnect_fraction: disconnect,
            disconnect_after: 3,
            bad_fraction: bad,
            seed: 7,
        }
    }

    #[test]
    fn kinds_follow_the_fractions_and_the_seed() {
        let m = mix_of(0.5, 0.1, 0.05);
        let n = 20_000;
        let kinds: Vec<Kind> = (0..n).map(|i| m.kind(i)).collect();
        let share = |f: fn(&Kind) -> bool| kinds.iter().filter(|k| f(k)).count() as f64 / n as f64;
        assert!((share(|k| matches!(k, Kind::Bad(_))) - 0.05).abs() < 0.01);
        assert!((share(|k| *k == Kind::Disconnect) - 0.1).abs() < 0.01);
        // Half of the remaining 85% stream.
        assert!((share(|k| *k == Kind::Stream) - 0.425).abs() < 0.015);
        for bad in Bad::ALL {
            assert!(kinds.contains(&Kind::Bad(bad)), "{bad:?} never drawn");
        }
        assert_eq!(kinds[..100], (0..100).map(|i| m.kind(i)).collect::<Vec<_>>()[..]);
        let none = mix_of(1.0, 0.0, 0.0);
        assert!((0..1000).all(|i| none.kind(i) == Kind::Stream));
    }

    #[test]
    fn bad_bodies_are_bad_in_one_way_only() {
        let valid = json!({"messages": [{"role": "user", "content": "caf\u{e9} au lait"}], "max_tokens": 8});
        assert!(serde_json::from_str::<Value>(&Bad::MalformedJson.spoil(&valid)).is_err());
        let parse = |b: Bad| serde_json::from_str::<Value>(&b.spoil(&valid)).unwrap();
        assert_eq!(parse(Bad::OutOfRange)["temperature"], 7.5);
        assert_eq!(parse(Bad::UnknownField)["soak_unknown_field"], true);
        assert_eq!(parse(Bad::OversizedMaxTokens)["max_tokens"], 1_000_000_000u64);
        for b in [Bad::OutOfRange, Bad::UnknownField] {
            assert_eq!(parse(b)["messages"], valid["messages"]);
            assert_eq!(parse(b)["max_tokens"], 8);
        }
    }
}
