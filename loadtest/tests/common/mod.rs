//! What the fake-server tests share: reading one HTTP/1.1 request off a raw socket, and a server thread.

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

/// Starts a fake server on its own runtime thread; `serve(socket, n)` answers the n-th connection (0-based;
/// what it returns is dropped).
/// Returns its base URL.
pub fn start_fake_server<F, Fut>(serve: F) -> String
where
    F: Fn(TcpStream, usize) -> Fut + Send + 'static,
    Fut: std::future::Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", std_listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let mut n = 0;
            loop {
                if let Ok((sock, _)) = listener.accept().await {
                    tokio::spawn(serve(sock, n));
                    n += 1;
                }
            }
        });
    });
    url
}
