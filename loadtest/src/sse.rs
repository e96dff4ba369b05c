//! Incremental server-sent-events parser: bytes in as they arrive, whole events out.
//!
//! Network chunks split lines, events and UTF-8 characters anywhere; this buffers until a line is whole and
//! dispatches an event at the blank line that ends it, per the WHATWG EventSource rules that matter here
//! (`data:` lines joined by `\n`, one optional space after the colon, `:` comments, `\n` or `\r\n` line ends).
//! It knows nothing about OpenAI or HTTP.

/// The most bytes one line may hold before the stream counts as malformed (a server that never sends `\n`).
pub const MAX_LINE_BYTES: usize = 4 << 20;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field, when the server named the event type.
    pub event: Option<String>,
    /// The `data:` lines joined by `\n`.
    pub data: String,
}

/// A byte stream that is not SSE.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SseError {
    #[error("SSE line is not UTF-8")]
    NotUtf8,
    #[error("SSE line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
}

/// Parser state between chunks.
#[derive(Debug, Default)]
pub struct Parser {
    buf: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Event>, SseError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos;
            let line = self.buf[start..end]
                .strip_suffix(b"\r")
                .unwrap_or(&self.buf[start..end]);
            let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?.to_string();
            start = end + 1;
            if let Some(ev) = self.line(&line) {
                out.push(ev);
            }
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_LINE_BYTES {
            return Err(SseError::LineTooLong);
        }
        Ok(out)
    }

    /// The stream ended: an event whose blank line never came (lenient, as browsers are not).
    pub fn finish(mut self) -> Result<Option<Event>, SseError> {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            let line = std::str::from_utf8(&rest).map_err(|_| SseError::NotUtf8)?.to_string();
            if let Some(ev) = self.line(&line) {
                return Ok(Some(ev));
            }
        }
        Ok(self.dispatch())
    }

    fn line(&mut self, line: &str) -> Option<Event> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "event" => self.event = Some(value.to_string()),
            _ => {} // id, retry and unknown fields do not matter to a load test
        }
        None
    }

    fn dispatch(&mut self) -> Option<Event> {
        let event = self.event.take();
        self.data.take().map(|data| Event { event, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> Vec<Event> {
        let mut p = Parser::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(p.push(c).unwrap());
        }
        out.extend(p.finish().unwrap());
        out
    }

    fn data(d: &str) -> Event {
        Event {
            event: None,
            data: d.to_string(),
        }
    }

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let stream = "data: {\"a\":\"é\"}\n\n: keep-alive\n\ndata:x\r\ndata: y\r\n\r\ndata: [DONE]\n\n".as_bytes();
        let whole = all(&[stream]);
        assert_eq!(whole, vec![data("{\"a\":\"é\"}"), data("x\ny"), data("[DONE]")]);
        for cut in 0..stream.len() {
            assert_eq!(all(&[&stream[..cut], &stream[cut..]]), whole, "cut at {cut}");
        }
        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(all(&bytewise), whole);
    }

    #[test]
    fn named_events_and_unterminated_tail() {
        assert_eq!(
            all(&[b"event: error\ndata: bad\n\ndata: tail"]),
            vec![
                Event {
                    event: Some("error".into()),
                    data: "bad".into()
                },
                data("tail")
            ]
        );
        assert_eq!(all(&[b"id: 1\nretry: 5\n\n"]), vec![]);
    }

    #[test]
    fn garbage_is_an_error() {
        assert_eq!(Parser::new().push(b"data: \xff\xfe\n"), Err(SseError::NotUtf8));
        let mut p = Parser::new();
        assert_eq!(p.push(&vec![b'a'; MAX_LINE_BYTES + 1]), Err(SseError::LineTooLong));
    }
}
