//! The blocking HTTP/1.1 client `fleetctl` uses for the fleet server's admin API: one
//! connection per request (plain `http://` only), an optional bearer token, JSON answers read
//! up to [`MAX_RESPONSE_BYTES`], uploads streamed from a file, one deadline per request, and
//! every failure naming the URL.

use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{
    HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HOST,
};
use hyper::{Method, Request};
use serde_json::Value;

/// Largest response body read (bytes); a larger answer is an error, not a truncation.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// How long a TCP connect may take before the server counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an upload waits for the server's `100 Continue` before sending anyway.
const CONTINUE_WAIT: Duration = Duration::from_secs(1);
/// Size of the pieces an upload is read and sent in.
const UPLOAD_CHUNK: usize = 64 * 1024;
/// Longest server error message kept when the body is not the API's JSON error.
const MAX_ERROR_TEXT: usize = 2000;

/// Why a request got no usable answer. `Status` is an answer: the server refused.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--server {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot reach the fleet server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the fleet server at {url} did not answer within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("{method} {url}: unusable answer: {reason}")]
    Protocol {
        method: String,
        url: String,
        reason: String,
    },
    #[error("{}: {message}", .path.display())]
    File { path: PathBuf, message: String },
    #[error("{method} {url}: HTTP {status}: {message}")]
    Status {
        method: String,
        url: String,
        status: u16,
        /// The server's `error` text (or the start of its body).
        message: String,
        /// The server's JSON body, when it sent one.
        body: Option<Value>,
    },
}

/// A parsed `--server` URL: `http://HOST[:PORT][/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// Host as written (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing `/` ("" for none).
    pub prefix: String,
    /// `host:port` for the `Host` header (IPv6 in brackets).
    authority: String,
}

impl ServerUrl {
    /// Parses `text`; errors name what is wrong with it.
    pub fn parse(text: &str) -> Result<ServerUrl, ClientError> {
        let bad = |reason: &str| ClientError::BadUrl {
            url: text.to_string(),
            reason: reason.to_string(),
        };
        let rest = if let Some(r) = text.strip_prefix("http://") {
            r
        } else if text.starts_with("https://") {
            return Err(bad(
                "https is not supported by this fleetctl (http only): use http:// on a trusted network or an SSH tunnel",
            ));
        } else {
            return Err(bad("expected http://HOST[:PORT][/PREFIX]"));
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            return Err(bad("no query or fragment allowed"));
        }
        if authority.contains('@') {
            return Err(bad(
                "no user info allowed (give the token with --token or --token-file)",
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed '[' in host"))?;
            match after {
                "" => (h, None),
                p => (
                    h,
                    Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
                ),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("the port is not a number in 1..=65535"))?,
        };
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(ServerUrl {
            host: host.to_string(),
            port,
            prefix: path.trim_end_matches('/').to_string(),
            authority,
        })
    }

    /// The full URL of `path_and_query` (which starts with `/`).
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}{path_and_query}", self.authority, self.prefix)
    }

    /// The server's base URL, for messages.
    pub fn base(&self) -> String {
        format!("http://{}{}", self.authority, self.prefix)
    }
}

/// A successful (2xx) answer: status and the JSON body (`null` when empty).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub json: Value,
}

/// The admin API client. Each request opens a connection, sends, reads the answer and closes.
#[derive(Debug)]
pub struct Client {
    server: ServerUrl,
    token: Option<String>,
    timeout: Duration,
    runtime: tokio::runtime::Runtime,
}

type ReqBody = UnsyncBoxBody<Bytes, std::io::Error>;

impl Client {
    /// A client of `server`, sending `token` as a bearer token if given; every request must
    /// be answered within `timeout`.
    pub fn new(
        server: ServerUrl,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Unreachable {
                url: server.base(),
                reason: format!("cannot start the I/O runtime: {e}"),
            })?;
        Ok(Client {
            server,
            token,
            timeout,
            runtime,
        })
    }

    pub fn server(&self) -> &ServerUrl {
        &self.server
    }

    /// Whether a token is sent.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// `GET path_and_query`.
    pub fn get(&self, path_and_query: &str) -> Result<Reply, ClientError> {
        self.send(Method::GET, path_and_query, empty(), 0, None)
    }

    /// `POST path` with a JSON body.
    pub fn post_json(&self, path: &str, body: &Value) -> Result<Reply, ClientError> {
        let bytes = Bytes::from(body.to_string());
        let len = bytes.len() as u64;
        let body = Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync();
        self.send(Method::POST, path, body, len, Some("application/json"))
    }

    /// `POST path` with the bytes of `file` as the body, streamed (never held whole).
    pub fn post_file(&self, path: &str, file: &Path) -> Result<Reply, ClientError> {
        let file_err = |e: std::io::Error| ClientError::File {
            path: file.to_path_buf(),
            message: e.to_string(),
        };
        let f = std::fs::File::open(file).map_err(file_err)?;
        let meta = f.metadata().map_err(file_err)?;
        if !meta.is_file() {
            return Err(ClientError::File {
                path: file.to_path_buf(),
                message: "not a regular file".into(),
            });
        }
        let len = meta.len();
        let (go, gate) = tokio::sync::oneshot::channel();
        let body = FileBody {
            file: f,
            remaining: len,
            gate: Some(gate),
            fallback: None,
        }
        .boxed_unsync();
        self.send_raw(
            Method::POST,
            path,
            body,
            len,
            Some("application/octet-stream"),
            Some(go),
        )
        .and_then(|(status, bytes)| self.json_reply(&Method::POST, path, status, &bytes))
        .map_err(|e| match e {
            ClientError::File { message, .. } => ClientError::File {
                path: file.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// `GET path_and_query` of a non-JSON resource (`/metrics`): the body as text.
    pub fn get_text(&self, path_and_query: &str) -> Result<String, ClientError> {
        let (_, bytes) = self.send_raw(Method::GET, path_and_query, empty(), 0, None, None)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// [`Client::send_raw`], then the 2xx body parsed as JSON.
    fn send(
        &self,
        method: Method,
        path: &str,
        body: ReqBody,
        len: u64,
        content_type: Option<&str>,
    ) -> Result<Reply, ClientError> {
        let (status, bytes) = self.send_raw(method.clone(), path, body, len, content_type, None)?;
        self.json_reply(&method, path, status, &bytes)
    }

    /// A 2xx body as JSON (`null` when empty).
    fn json_reply(
        &self,
        method: &Method,
        path: &str,
        status: u16,
        bytes: &[u8],
    ) -> Result<Reply, ClientError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Reply {
                status,
                json: Value::Null,
            });
        }
        let json = serde_json::from_slice(bytes).map_err(|_| ClientError::Protocol {
            method: method.to_string(),
            url: self.server.url(path),
            reason: format!(
                "HTTP {status} with a body that is not JSON: {}",
                snippet(bytes)
            ),
        })?;
        Ok(Reply { status, json })
    }

    /// Sends one request; a 2xx answer is returned as status and body, anything else is
    /// [`ClientError::Status`] with the server's `error` message. With `expect_continue`,
    /// the request carries `Expect: 100-continue` and the sender is fired on the server's
    /// `100 Continue` (the body waits for it, see [`FileBody`]), so a server that refuses
    /// the request (401, 403, 413) answers before any of the body is sent.
    fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: ReqBody,
        len: u64,
        content_type: Option<&str>,
        expect_continue: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let url = self.server.url(path);
        let target = format!("{}{path}", self.server.prefix);
        let protocol = |reason: String| ClientError::Protocol {
            method: method.to_string(),
            url: url.clone(),
            reason,
        };
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(&target)
            .header(HOST, self.server.authority.as_str())
            .header(ACCEPT, "application/json")
            .header(CONTENT_LENGTH, len);
        if let Some(ct) = content_type {
            builder = builder.header(CONTENT_TYPE, ct);
        }
        if let Some(t) = &self.token {
            let value =
                HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| ClientError::BadUrl {
                    url: self.server.base(),
                    reason: "the token contains characters not allowed in an HTTP header".into(),
                })?;
            builder = builder.header(AUTHORIZATION, value);
        }
        if expect_continue.is_some() {
            builder = builder.header(EXPECT, "100-continue");
        }
        let mut request = builder
            .body(body)
            .map_err(|e| protocol(format!("cannot build the request: {e}")))?;
        if let Some(go) = expect_continue {
            let go = std::sync::Mutex::new(Some(go));
            hyper::ext::on_informational(&mut request, move |res| {
                if res.status() == hyper::StatusCode::CONTINUE {
                    if let Some(go) = go.lock().ok().and_then(|mut g| g.take()) {
                        let _ = go.send(());
                    }
                }
            });
        }
        let exchange = exchange(&self.server, request, &url, &method);
        let (status, bytes) = self
            .runtime
            .block_on(async { tokio::time::timeout(self.timeout, exchange).await })
            .map_err(|_| ClientError::Timeout {
                url: url.clone(),
                secs: self.timeout.as_secs(),
            })??;
        if (200..300).contains(&status) {
            return Ok((status, bytes));
        }
        let json: Option<Value> = serde_json::from_slice(&bytes).ok();
        let message = json
            .as_ref()
            .and_then(|j| j.get("error"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| {
                let text = snippet(&bytes);
                if text.is_empty() {
                    hyper::StatusCode::from_u16(status)
                        .ok()
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("no message")
                        .to_string()
                } else {
                    text
                }
            });
        Err(ClientError::Status {
            method: method.to_string(),
            url,
            status,
            message,
            body: json.filter(|j| !j.is_null()),
        })
    }
}

/// The start of a body as text, for messages.
fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    match text.char_indices().nth(MAX_ERROR_TEXT) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

fn empty() -> ReqBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Connects, sends `request` and reads the answer (at most [`MAX_RESPONSE_BYTES`]).
async fn exchange(
    server: &ServerUrl,
    request: Request<ReqBody>,
    url: &str,
    method: &Method,
) -> Result<(u16, Vec<u8>), ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable {
        url: server.base(),
        reason,
    };
    let protocol = |reason: String| ClientError::Protocol {
        method: method.to_string(),
        url: url.to_string(),
        reason,
    };
    let connect = tokio::net::TcpStream::connect((server.host.as_str(), server.port));
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| {
            unreachable(format!(
                "no connection within {} s",
                CONNECT_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
    let driver = tokio::spawn(connection);
    let result = async {
        let response = sender.send_request(request).await.map_err(|e| {
            if e.is_parse() || e.is_parse_status() {
                protocol(format!("not an HTTP answer: {e}"))
            } else if let Some(f) = file_error(&e) {
                f
            } else {
                unreachable(format!("the connection failed during the request: {e}"))
            }
        })?;
        let status = response.status().as_u16();
        let body = match Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes().to_vec(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(protocol(format!(
                    "the answer is larger than {MAX_RESPONSE_BYTES} bytes"
                )))
            }
            // a refusal whose body was lost (a server that answers before reading an upload
            // and closes may reset the connection under it): the status is the answer
            Err(_) if !(200..300).contains(&status) => Vec::new(),
            Err(e) => return Err(protocol(format!("the answer was cut off: {e}"))),
        };
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}

/// The upload file's read error inside a hyper error, if that is what failed.
fn file_error(e: &hyper::Error) -> Option<ClientError> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(f) = s.downcast_ref::<UploadError>() {
            return Some(ClientError::File {
                path: PathBuf::new(),
                message: f.0.clone(),
            });
        }
        source = s.source();
    }
    None
}

/// A failed read of the file being uploaded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UploadError(String);

/// A request body read from a file in [`UPLOAD_CHUNK`] pieces, exactly `remaining` bytes.
/// The reads are blocking: the client runs one request at a time on its own runtime, and
/// the file is local. Nothing is sent until `gate` fires (the server's `100 Continue`) or
/// [`CONTINUE_WAIT`] passed since the first poll (a server that ignores `Expect`).
struct FileBody {
    file: std::fs::File,
    remaining: u64,
    gate: Option<tokio::sync::oneshot::Receiver<()>>,
    fallback: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        if let Some(gate) = this.gate.as_mut() {
            let fallback = this
                .fallback
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(CONTINUE_WAIT)));
            // a closed gate (the request is over) also lets the body go: hyper stops polling
            if Pin::new(gate).poll(cx).is_pending() && fallback.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.gate = None;
            this.fallback = None;
        }
        let want = usize::try_from(this.remaining)
            .unwrap_or(UPLOAD_CHUNK)
            .min(UPLOAD_CHUNK);
        let mut buf = vec![0u8; want];
        let result = match this.file.read(&mut buf) {
            Ok(0) => Err(std::io::Error::other(UploadError(
                "the file became shorter while it was uploaded".into(),
            ))),
            Ok(n) => {
                buf.truncate(n);
                this.remaining -= n as u64;
                Ok(Frame::data(Bytes::from(buf)))
            }
            Err(e) => Err(std::io::Error::other(UploadError(format!("read: {e}")))),
        };
        Poll::Ready(Some(result))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Percent-encodes `s` for use as one path segment or query value (everything but
/// `A-Z a-z 0-9 - . _ ~`).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_parse_or_name_the_problem() {
        let u = ServerUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("127.0.0.1", 8080, "")
        );
        assert_eq!(u.url("/v1/health"), "http://127.0.0.1:8080/v1/health");
        let u = ServerUrl::parse("http://fleet.example/admin/").unwrap();
        assert_eq!((u.port, u.prefix.as_str()), (80, "/admin"));
        assert_eq!(
            u.url("/v1/devices"),
            "http://fleet.example:80/admin/v1/devices"
        );
        let u = ServerUrl::parse("http://[::1]:9000").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9000));
        assert_eq!(u.base(), "http://[::1]:9000");
        for (bad, why) in [
            ("https://x", "https is not supported"),
            ("127.0.0.1:8080", "expected http://"),
            ("http://:80", "no host"),
            ("http://h:99999", "port"),
            ("http://u:p@h", "user info"),
            ("http://h/x?y=1", "query"),
        ] {
            let e = ServerUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn encode_keeps_unreserved_only() {
        assert_eq!(encode("dev-01_a.b~"), "dev-01_a.b~");
        assert_eq!(encode("site=a,line=3"), "site%3Da%2Cline%3D3");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
        assert_eq!(encode("é"), "%C3%A9");
    }
}
