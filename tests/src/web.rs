//! The dashboard as a browser without JavaScript uses it: GET pages and POST forms with a
//! session cookie (and the hub's own `Origin`, as a same-origin form sends), log people in,
//! add members to orgs; plus a local webhook receiver that answers 200 and records which
//! deliveries reached it.

use crate::{TestHub, ADMIN_EMAIL};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A page (or a form's answer) as the browser got it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// The `Location` of a redirect.
    pub location: Option<String>,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

/// Send `method path` with the session `cookie`; a `form` (urlencoded) goes as a
/// same-origin form post.
pub async fn browse(hub: &TestHub, cookie: Option<&str>, method: &str, path: &str, form: Option<&str>) -> Answer {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
    let mut request = hyper::Request::builder().method(method).uri(format!("http://{}{path}", hub.http));
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    if form.is_some() {
        request = request.header("content-type", "application/x-www-form-urlencoded").header("origin", format!("http://{}", hub.http));
    }
    let request = request.body(Full::new(bytes::Bytes::from(form.unwrap_or("").to_string()))).expect("request");
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(request)).await.expect("request timed out").expect("request failed");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let location = headers.get("location").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = response.into_body().collect().await.expect("body").to_bytes();
    Answer { status, location, headers, body: String::from_utf8_lossy(&body).into_owned() }
}

/// `GET path` with `cookie`.
pub async fn page(hub: &TestHub, cookie: &str, path: &str) -> Answer {
    browse(hub, Some(cookie), "GET", path, None).await
}

/// `POST path` with the urlencoded `form` and `cookie`.
pub async fn post_form(hub: &TestHub, cookie: &str, path: &str, form: &str) -> Answer {
    browse(hub, Some(cookie), "POST", path, Some(form)).await
}

/// Percent-encode a form value.
pub fn form_value(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// Log in through the JSON API: the session cookie (`name=value`), or `None` when refused.
pub async fn try_login(hub: &TestHub, email: &str, password: &str) -> Option<String> {
    let (status, _, cookie) = hub.api().anonymous().login(&json!({ "email": email, "password": password })).await;
    (status == 200).then_some(cookie).flatten()
}

/// Log in; the session cookie.
pub async fn login(hub: &TestHub, email: &str, password: &str) -> String {
    try_login(hub, email, password).await.unwrap_or_else(|| panic!("{email} could not log in"))
}

/// Create the account `email` with `password` and make it a member of `org` with `role`
/// (as the operator); the user id.
pub async fn add_member(hub: &TestHub, email: &str, password: &str, org: &str, role: &str) -> String {
    assert_ne!(email, ADMIN_EMAIL);
    let (status, user) = hub.api().post("/api/v1/users", &json!({ "email": email, "password": password })).await;
    assert_eq!(status, 201, "create user: {user}");
    let id = user["id"].as_str().expect("user id").to_string();
    let body = serde_json::to_vec(&json!({ "role": role })).expect("json");
    let (status, _, text) = hub.api().send("PUT", &format!("/api/v1/orgs/{org}/members/{id}"), Some("application/json"), body).await;
    assert_eq!(status, 200, "add member: {text}");
    id
}

/// A webhook endpoint on loopback that answers every delivery with 200 and records the
/// `Gantry-Delivery` id of each request, in arrival order.
#[derive(Debug)]
pub struct WebhookReceiver {
    addr: SocketAddr,
    deliveries: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start() -> WebhookReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
        let addr = listener.local_addr().expect("receiver address");
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let record = deliveries.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let Some(delivery) = read_delivery(&mut stream).await else { return };
                    record.lock().unwrap_or_else(|p| p.into_inner()).push(delivery);
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        WebhookReceiver { addr, deliveries, task }
    }

    /// The URL to register as the endpoint.
    pub fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    /// Delivery ids received so far.
    pub fn deliveries(&self) -> Vec<String> {
        self.deliveries.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP/1.1 request as a test endpoint received it.
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    /// `METHOD PATH HTTP/1.1`.
    pub request_line: String,
    /// Header names in lowercase.
    pub headers: std::collections::HashMap<String, String>,
    pub body: Vec<u8>,
}

/// Read one request (head and `Content-Length` body) from `stream`; `None` if the peer
/// closes first, or opens with a TLS handshake (these endpoints speak plain HTTP; giving up
/// at once lets a client that tries HTTPS first fall back without waiting).
pub async fn read_http_request(stream: &mut tokio::net::TcpStream) -> Option<HttpRequest> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
        if data.first() == Some(&0x16) {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default().to_string();
    let headers: std::collections::HashMap<String, String> =
        lines.filter_map(|l| l.split_once(':')).map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string())).collect();
    let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while data.len() < head_end + length {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
    Some(HttpRequest { request_line, headers, body: data[head_end..head_end + length].to_vec() })
}

/// Read one request; its `Gantry-Delivery` header.
async fn read_delivery(stream: &mut tokio::net::TcpStream) -> Option<String> {
    read_http_request(stream).await?.headers.get("gantry-delivery").cloned()
}
