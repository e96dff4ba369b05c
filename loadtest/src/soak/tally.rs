//! Soak accounting: every answer goes into one [`Class`], decided by what was sent ([`Kind`]) and what came
//! back, and the classes are counted in [`Counts`]. Pure: no I/O, no clock.

use std::collections::BTreeMap;

use serde::Serialize;

use super::traffic::Kind;
use crate::client::{RequestError, Sample};

/// What became of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A well-formed request answered 2xx and read to its end.
    Completed,
    /// A disconnecting request whose stream the client closed as planned.
    Disconnected,
    /// A bad request refused with its expected status.
    ExpectedClientError,
    /// 429, with or without a `Retry-After` header.
    Refused { retry_after: bool },
    /// A well-formed request refused with a 4xx other than 429.
    UnexpectedClientError,
    /// A bad request answered 2xx.
    BadAccepted,
    /// A bad request refused with a 4xx other than the expected one (or 429).
    BadWrongStatus,
    /// Any 5xx.
    ServerError,
    /// 1xx or 3xx: not an answer an API client can use.
    OtherStatus,
    /// No usable answer: cannot connect, timeout, broken or malformed stream or body, error event mid-stream.
    Transport,
}

/// Puts one outcome of a request of `kind` in its class.
pub fn classify(kind: Kind, outcome: &Result<Sample, RequestError>) -> Class {
    let bad = match kind {
        Kind::Bad(b) => Some(b),
        _ => None,
    };
    match (outcome, bad) {
        (Ok(_), Some(_)) => Class::BadAccepted,
        (Ok(s), None) if s.disconnected => Class::Disconnected,
        (Ok(_), None) => Class::Completed,
        (Err(RequestError::Status { code, retry_after }), _) => match (*code, bad) {
            (429, _) => Class::Refused {
                retry_after: retry_after.as_deref().is_some_and(|v| !v.trim().is_empty()),
            },
            (500..=599, _) => Class::ServerError,
            (400..=499, Some(b)) if *code == b.expected_status() => Class::ExpectedClientError,
            (400..=499, Some(_)) => Class::BadWrongStatus,
            (400..=499, None) => Class::UnexpectedClientError,
            _ => Class::OtherStatus,
        },
        (Err(_), _) => Class::Transport,
    }
}

/// Answers counted by class, with detail where something went wrong.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Counts {
    /// Requests that ended, whatever their answer.
    pub answered: u64,
    /// Requests sent of each kind (bad ones by how they were bad).
    pub sent_by_kind: BTreeMap<String, u64>,
    pub completed_stream: u64,
    pub completed_plain: u64,
    pub disconnected: u64,
    pub expected_4xx: u64,
    /// Every 429, with or without `Retry-After`.
    pub refused_429: u64,
    pub refused_429_without_retry_after: u64,
    pub unexpected_4xx: u64,
    pub bad_accepted: u64,
    pub bad_wrong_status: u64,
    pub server_5xx: u64,
    pub other_status: u64,
    pub transport: u64,
    /// HTTP status of every answer that had one (2xx included).
    pub by_status: BTreeMap<u16, u64>,
    /// Transport errors by kind (`connect`, `timeout`, `incomplete_stream`, ...).
    pub transport_by_kind: BTreeMap<String, u64>,
    /// The first case of each class that fails a rule, described.
    pub examples: BTreeMap<String, String>,
}

fn kind_label(kind: Kind) -> String {
    match kind {
        Kind::Bad(b) => format!("bad_{}", serde_label(&b)),
        k => serde_label(&k),
    }
}

fn serde_label<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

impl Counts {
    /// Counts one outcome of a request of `kind`; returns its class.
    pub fn record(&mut self, kind: Kind, outcome: &Result<Sample, RequestError>) -> Class {
        let class = classify(kind, outcome);
        self.answered += 1;
        *self.sent_by_kind.entry(kind_label(kind)).or_default() += 1;
        match outcome {
            Ok(_) => *self.by_status.entry(200).or_default() += 1,
            Err(RequestError::Status { code, .. }) => *self.by_status.entry(*code).or_default() += 1,
            Err(e) => *self.transport_by_kind.entry(e.kind()).or_default() += 1,
        }
        let (counter, failing) = match class {
            Class::Completed if kind == Kind::Plain => (&mut self.completed_plain, None),
            Class::Completed => (&mut self.completed_stream, None),
            Class::Disconnected => (&mut self.disconnected, None),
            Class::ExpectedClientError => (&mut self.expected_4xx, None),
            Class::Refused { retry_after: true } => (&mut self.refused_429, None),
            Class::Refused { retry_after: false } => {
                self.refused_429_without_retry_after += 1;
                (&mut self.refused_429, Some("refused_429_without_retry_after"))
            }
            Class::UnexpectedClientError => (&mut self.unexpected_4xx, Some("unexpected_4xx")),
            Class::BadAccepted => (&mut self.bad_accepted, Some("bad_accepted")),
            Class::BadWrongStatus => (&mut self.bad_wrong_status, Some("bad_wrong_status")),
            Class::ServerError => (&mut self.server_5xx, Some("server_5xx")),
            Class::OtherStatus => (&mut self.other_status, Some("other_status")),
            Class::Transport => (&mut self.transport, Some("transport")),
        };
        *counter += 1;
        if let Some(name) = failing {
            let what = match outcome {
                Ok(_) => "2xx".to_string(),
                Err(e) => e.to_string(),
            };
            self.examples
                .entry(name.to_string())
                .or_insert_with(|| format!("{what} to a {} request", kind_label(kind)));
        }
        class
    }

    /// Requests answered 2xx and read to the end (or hung up on as planned).
    pub fn served(&self) -> u64 {
        self.completed_stream + self.completed_plain + self.disconnected
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::TokenSource;
    use crate::soak::traffic::Bad;
    use std::time::Duration;

    fn ok(disconnected: bool) -> Result<Sample, RequestError> {
        Ok(Sample {
            ttft: None,
            itl: vec![],
            e2e: Duration::from_millis(5),
            output_tokens: 3,
            token_source: TokenSource::Usage,
            prompt_tokens: None,
            disconnected,
        })
    }

    fn status(code: u16, retry_after: Option<&str>) -> Result<Sample, RequestError> {
        Err(RequestError::Status {
            code,
            retry_after: retry_after.map(str::to_string),
        })
    }

    #[test]
    fn classes() {
        let bad = Kind::Bad(Bad::UnknownField);
        assert_eq!(classify(Kind::Stream, &ok(false)), Class::Completed);
        assert_eq!(classify(Kind::Disconnect, &ok(true)), Class::Disconnected);
        assert_eq!(
            classify(Kind::Disconnect, &ok(false)),
            Class::Completed,
            "ended before k chunks"
        );
        assert_eq!(classify(bad, &ok(false)), Class::BadAccepted);
        assert_eq!(classify(bad, &status(400, None)), Class::ExpectedClientError);
        assert_eq!(classify(bad, &status(422, None)), Class::BadWrongStatus);
        assert_eq!(
            classify(bad, &status(429, Some("1"))),
            Class::Refused { retry_after: true }
        );
        assert_eq!(
            classify(Kind::Plain, &status(429, Some(" "))),
            Class::Refused { retry_after: false }
        );
        assert_eq!(classify(Kind::Plain, &status(400, None)), Class::UnexpectedClientError);
        assert_eq!(classify(Kind::Plain, &status(503, Some("5"))), Class::ServerError);
        assert_eq!(classify(Kind::Plain, &status(302, None)), Class::OtherStatus);
        assert_eq!(classify(Kind::Stream, &Err(RequestError::Incomplete)), Class::Transport);
    }

    #[test]
    fn counts_and_examples() {
        let mut c = Counts::default();
        c.record(Kind::Stream, &ok(false));
        c.record(Kind::Plain, &ok(false));
        c.record(Kind::Disconnect, &ok(true));
        c.record(Kind::Plain, &status(429, Some("1")));
        c.record(Kind::Stream, &status(429, None));
        c.record(Kind::Plain, &status(500, None));
        c.record(Kind::Stream, &Err(RequestError::Timeout));
        c.record(Kind::Bad(Bad::MalformedJson), &status(400, None));
        assert_eq!(c.answered, 8);
        assert_eq!((c.completed_stream, c.completed_plain, c.disconnected), (1, 1, 1));
        assert_eq!((c.refused_429, c.refused_429_without_retry_after), (2, 1));
        assert_eq!((c.server_5xx, c.transport, c.expected_4xx), (1, 1, 1));
        assert_eq!(c.served(), 3);
        assert_eq!(c.by_status[&200], 3);
        assert_eq!(c.by_status[&429], 2);
        assert_eq!(c.transport_by_kind["timeout"], 1);
        assert_eq!(c.sent_by_kind["bad_malformed_json"], 1);
        assert_eq!(c.sent_by_kind["stream"], 3);
        assert_eq!(c.examples["server_5xx"], "HTTP 500 to a plain request");
        assert_eq!(
            c.examples["refused_429_without_retry_after"],
            "HTTP 429 to a stream request"
        );
        assert!(!c.examples.contains_key("expected_4xx"));
    }
}
