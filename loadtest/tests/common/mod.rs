//! What the fake-server tests share: reading one HTTP/1.1 request off a raw socket.

#![allow(dead_code)] // each test crate uses its own part

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// One request as the fake servers see it.
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Reads one request (headers and a content-length body); `None` when the client closed first.
pub async fn read_request(sock: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let mut first = head.split_whitespace();
    let method = first.next()?.to_uppercase();
    let path = first.next()?.to_string();
    Some(Request {
        method,
        path,
        body: buf[head_end..head_end + len].to_vec(),
    })
}
