//! A small W3C WebDriver client that drives Debian's headless Chromium through
//! `chromedriver`, for the dashboard's end-to-end tests.
//!
//! [`Browser::start`] runs chromedriver on a free loopback port (in its own process group),
//! opens a session with a throw-away profile, and on drop ends the session and kills the
//! whole group, so no browser outlives its test. Under `CI=true` a missing chromium or
//! chromedriver fails the test with a clear message; it is never skipped silently.

use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where Debian installs the browser and its driver.
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The W3C key under which an element reference travels.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// An error answered by the driver (`{"value": {"error", "message"}}`), or a transport failure.
#[derive(Debug, Clone, PartialEq)]
pub struct DriverError {
    /// The W3C error code, such as `no such element`.
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

/// A found element; valid until the page it belongs to goes away.
#[derive(Debug, Clone, PartialEq)]
pub struct Element(pub String);

/// Whether the browser and its driver are installed. Outside CI a missing one makes the test
/// return early (saying so on stderr); under `CI=true` it panics with what to install.
pub fn available() -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER].into_iter().filter(|p| !Path::new(p).exists()).collect();
    crate::prerequisite((!missing.is_empty()).then(|| {
        format!(
            "{} missing: the dashboard browser tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
            missing.join(" and ")
        )
    }))
}

/// What a QR code drawn as inline SVG says, read the way a phone would: Chromium paints it
/// (`--screenshot`, no WebDriver) and ZBar's `zbarimg` decodes the picture. Panics with what
/// to install when either is missing.
pub fn decode_qr(svg: &str, dir: &Path) -> String {
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: reading QR codes needs Debian's chromium (apt-get install chromium)");
    let zbar = std::process::Command::new("sh").args(["-c", "command -v zbarimg"]).output().is_ok_and(|o| o.status.success());
    assert!(zbar, "zbarimg is missing: reading QR codes needs Debian's zbar-tools (apt-get install zbar-tools; .ci/run does)");
    let page = dir.join("qr.html");
    let picture = dir.join("qr.png");
    std::fs::write(
        &page,
        format!("<!doctype html><html><body bgcolor=\"#ffffff\">{}</body></html>", svg.replacen("<svg ", "<svg width=\"400\" height=\"400\" ", 1)),
    )
    .expect("write the QR page");
    let profile = dir.join("qr-profile");
    let output = std::process::Command::new(CHROMIUM)
        .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=500,500"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", picture.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("run chromium");
    assert!(picture.exists(), "chromium made no screenshot: {}", String::from_utf8_lossy(&output.stderr));
    let output = std::process::Command::new("zbarimg").args(["--raw", "-q"]).arg(&picture).output().expect("run zbarimg");
    assert!(output.status.success(), "zbarimg found no QR code in {}: {}", picture.display(), String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim_end_matches('\n').to_string()
}

/// Where screenshots go: `target/screenshots/` of this workspace.
pub fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    // Tests run from target/<profile>/deps/.
    let target = exe.ancestors().find(|p| p.file_name().is_some_and(|n| n == "target")).map(Path::to_path_buf);
    let dir = target.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target")).join("screenshots");
    std::fs::create_dir_all(&dir).expect("create screenshot dir");
    dir
}

/// One headless Chromium session.
#[derive(Debug)]
pub struct Browser {
    driver: std::process::Child,
    port: u16,
    session: String,
    profile: PathBuf,
}

impl Browser {
    /// Start chromedriver and a headless session with a fresh profile.
    pub async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port").local_addr().expect("addr").port();
        let profile = std::env::temp_dir().join(format!("gantry-chromium-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&profile).expect("create profile dir");
        let driver = {
            use std::os::unix::process::CommandExt;
            std::process::Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                // Its own process group, so drop can kill chromedriver and every browser
                // process it started in one signal.
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {CHROMEDRIVER}: {e}"))
        };
        let mut browser = Browser { driver, port, session: String::new(), profile };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(status) = browser.call("GET", "/status", None).await {
                if status["ready"] == true {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not become ready on port {port} within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-extensions", "--window-size=1280,900",
                    format!("--user-data-dir={}", browser.profile.display()),
                ],
            },
        } } });
        let session = browser.call("POST", "/session", Some(capabilities)).await.unwrap_or_else(|e| panic!("new chromium session: {e}"));
        browser.session = session["sessionId"].as_str().expect("session id").to_string();
        browser
    }

    /// One WebDriver command; the `value` of its answer.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, DriverError> {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
        let bytes = body.map(|b| serde_json::to_vec(&b).expect("json")).unwrap_or_default();
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{}{path}", self.port))
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(bytes)))
            .expect("request");
        let transport = |e: String| DriverError { error: "transport".into(), message: e };
        let response = tokio::time::timeout(Duration::from_secs(60), client.request(request))
            .await
            .map_err(|_| transport(format!("{method} {path} timed out")))?
            .map_err(|e| transport(e.to_string()))?;
        let ok = response.status().is_success();
        let body = response.into_body().collect().await.map_err(|e| transport(e.to_string()))?.to_bytes();
        let mut value: Value = serde_json::from_slice(&body).map_err(|e| transport(format!("driver answered non-JSON: {e}")))?;
        let value = value["value"].take();
        if ok {
            Ok(value)
        } else {
            Err(DriverError { error: value["error"].as_str().unwrap_or("unknown").into(), message: value["message"].as_str().unwrap_or_default().into() })
        }
    }

    async fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, DriverError> {
        self.call(method, &format!("/session/{}{path}", self.session), body).await
    }

    /// Load `url` and wait for the document to load.
    pub async fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url }))).await.unwrap_or_else(|e| panic!("navigating to {url}: {e}"));
    }

    /// The current URL.
    pub async fn url(&self) -> String {
        self.session_call("GET", "/url", None).await.expect("current url").as_str().unwrap_or_default().to_string()
    }

    /// The page title.
    pub async fn title(&self) -> String {
        self.session_call("GET", "/title", None).await.expect("title").as_str().unwrap_or_default().to_string()
    }

    /// The first element matching the CSS `selector`, if any.
    pub async fn find(&self, selector: &str) -> Option<Element> {
        match self.session_call("POST", "/element", Some(json!({ "using": "css selector", "value": selector }))).await {
            Ok(value) => value[ELEMENT_KEY].as_str().map(|id| Element(id.to_string())),
            Err(e) if e.error == "no such element" => None,
            Err(e) => panic!("finding {selector}: {e}"),
        }
    }

    /// Every element matching the CSS `selector`.
    pub async fn find_all(&self, selector: &str) -> Vec<Element> {
        let value = self
            .session_call("POST", "/elements", Some(json!({ "using": "css selector", "value": selector })))
            .await
            .unwrap_or_else(|e| panic!("finding {selector}: {e}"));
        value.as_array().into_iter().flatten().filter_map(|v| v[ELEMENT_KEY].as_str()).map(|id| Element(id.to_string())).collect()
    }

    /// The element matching `selector`; fails the test when there is none.
    pub async fn element(&self, selector: &str) -> Element {
        match self.find(selector).await {
            Some(element) => element,
            None => panic!("no element matches {selector} on {}", self.url().await),
        }
    }

    /// Click `element`.
    pub async fn click(&self, element: &Element) {
        self.session_call("POST", &format!("/element/{}/click", element.0), Some(json!({}))).await.unwrap_or_else(|e| panic!("click: {e}"));
    }

    /// Click the element matching `selector`.
    pub async fn click_on(&self, selector: &str) {
        let element = self.element(selector).await;
        self.click(&element).await;
    }

    /// Clear the field matching `selector` and type `text` into it.
    pub async fn fill(&self, selector: &str, text: &str) {
        let element = self.element(selector).await;
        self.session_call("POST", &format!("/element/{}/clear", element.0), Some(json!({}))).await.unwrap_or_else(|e| panic!("clear {selector}: {e}"));
        self.session_call("POST", &format!("/element/{}/value", element.0), Some(json!({ "text": text })))
            .await
            .unwrap_or_else(|e| panic!("type into {selector}: {e}"));
    }

    /// Choose the option with `value` in the `<select>` matching `selector`.
    pub async fn select(&self, selector: &str, value: &str) {
        self.click_on(&format!("{selector} option[value=\"{value}\"]")).await;
    }

    /// The rendered text of `element`, or `None` if it went stale.
    pub async fn text_of(&self, element: &Element) -> Option<String> {
        self.session_call("GET", &format!("/element/{}/text", element.0), None).await.ok().and_then(|v| v.as_str().map(String::from))
    }

    /// The rendered text of the first element matching `selector`, if there is one.
    pub async fn text(&self, selector: &str) -> Option<String> {
        let element = self.find(selector).await?;
        self.text_of(&element).await
    }

    /// An attribute of the first element matching `selector`.
    pub async fn attribute(&self, selector: &str, name: &str) -> Option<String> {
        let element = self.find(selector).await?;
        self.session_call("GET", &format!("/element/{}/attribute/{name}", element.0), None).await.ok().and_then(|v| v.as_str().map(String::from))
    }

    /// A cookie the browser holds for the current page (HttpOnly ones included), as `name=value`.
    pub async fn cookie(&self, name: &str) -> Option<String> {
        let value = self.session_call("GET", &format!("/cookie/{name}"), None).await.ok()?;
        Some(format!("{name}={}", value["value"].as_str()?))
    }

    /// Wait until `check` returns `Some`, polling every 100 ms; fails the test after `limit`,
    /// saving a screenshot named after `what` to show the page as it was.
    pub async fn wait_for<T, F, Fut>(&self, limit: Duration, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if Instant::now() >= deadline {
                let name: String = what.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(60).collect();
                let shot = self.screenshot(&format!("timeout-{name}")).await;
                panic!("timed out after {limit:?} waiting for {what} on {} (screenshot {})", self.url().await, shot.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until the element matching `selector` shows text containing `needle`.
    pub async fn wait_text(&self, selector: &str, needle: &str, limit: Duration) -> String {
        self.wait_for(limit, &format!("{selector} to show {needle:?}"), || async {
            let text = self.text(selector).await?;
            text.contains(needle).then_some(text)
        })
        .await
    }

    /// Save a PNG of the viewport as `target/screenshots/NAME.png`; its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let data = self.session_call("GET", "/screenshot", None).await.unwrap_or_else(|e| panic!("screenshot: {e}"));
        let png = base64::engine::general_purpose::STANDARD.decode(data.as_str().unwrap_or_default()).expect("screenshot is base64");
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        let path = screenshot_dir().join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// Run `script` in the page (`arguments` are the `args`); its return value.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.session_call("POST", "/execute/sync", Some(json!({ "script": script, "args": args }))).await.unwrap_or_else(|e| panic!("execute: {e}"))
    }

    /// End the session and stop the driver.
    pub async fn quit(mut self) {
        let _ = self.session_call("DELETE", "", None).await;
        self.session.clear();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // Best effort, without a runtime: a plain HTTP/1.0 DELETE closes the browser.
            use std::io::{Read, Write};
            if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = write!(stream, "DELETE /session/{} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n", self.session);
                let _ = stream.read_to_end(&mut Vec::new());
            }
        }
        // The driver leads its own process group: one signal ends it and anything it started.
        let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{}", self.driver.id())]).status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
