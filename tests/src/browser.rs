//! A real browser under test: Debian's headless Chromium driven over WebDriver by its
//! `chromedriver`, with a fresh profile per browser and nothing fetched from the network (the
//! flags below turn off every background download; no tool downloads a browser).
//!
//! [`Browser::start`] fails with what to install when `chromium` or `chromedriver` is missing
//! (`.ci/run` installs both). Screenshots go to `target/browser-artefacts/` (override with
//! `WARPLINE_ARTEFACTS`) and are kept as the test's artefacts.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::repo_root;

/// The WebDriver element key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where screenshots are saved.
pub fn artefacts_dir() -> PathBuf {
    std::env::var_os("WARPLINE_ARTEFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target").join("browser-artefacts"))
}

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// A headless Chromium session.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::blocking::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a Chromium session with a fresh profile (1400×900).
    pub fn start() -> Browser {
        let chromium = find_program(&["chromium", "chromium-browser"]).unwrap_or_else(|| {
            panic!("no `chromium` on PATH: install Debian's `chromium` and `chromium-driver` (.ci/run does)")
        });
        let driver_bin = find_program(&["chromedriver"]).unwrap_or_else(|| {
            panic!("no `chromedriver` on PATH: install Debian's `chromium-driver` (.ci/run does)")
        });
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", driver_bin.display()));
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("an HTTP client");
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/status")).send().is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not start within 20 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::Builder::new()
            .prefix("warpline-chromium-")
            .tempdir()
            .expect("a profile directory");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-default-apps", "--no-first-run",
                    "--disable-extensions", "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.path().display()),
                    "--window-size=1400,900", "--lang=en-GB",
                ],
            },
        }}});
        let resp: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .and_then(|r| r.json())
            .expect("chromedriver answers a new session");
        let session = resp["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {resp}"))
            .to_string();
        let mut b = Browser {
            driver,
            base,
            session,
            http,
            _profile: profile,
        };
        b.cmd(
            "POST",
            "timeouts",
            json!({"implicit": 0, "pageLoad": 30000, "script": 10000}),
        );
        b
    }

    fn cmd(&mut self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}/{path}", self.base, self.session);
        let req = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self.http.post(&url).json(&body),
        };
        let resp: Value = req
            .send()
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        resp["value"].clone()
    }

    fn try_cmd(&mut self, method: &str, path: &str, body: Value) -> Result<Value, String> {
        let v = self.cmd(method, path, body);
        match v.get("error") {
            Some(e) => Err(format!("{e}: {}", v["message"])),
            None => Ok(v),
        }
    }

    /// Opens `url` and waits for the page to load.
    pub fn goto(&mut self, url: &str) {
        self.try_cmd("POST", "url", json!({"url": url}))
            .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
    }

    /// The current URL.
    pub fn url(&mut self) -> String {
        self.cmd("GET", "url", json!({}))
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub fn js(&mut self, script: &str, args: Value) -> Value {
        self.try_cmd(
            "POST",
            "execute/sync",
            json!({"script": script, "args": args}),
        )
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// The elements matching a CSS selector, now.
    pub fn count(&mut self, css: &str) -> usize {
        self.js(
            "return document.querySelectorAll(arguments[0]).length;",
            json!([css]),
        )
        .as_u64()
        .unwrap_or(0) as usize
    }

    /// The text of the first element matching `css`, if any.
    pub fn text(&mut self, css: &str) -> Option<String> {
        let v = self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            json!([css]),
        );
        v.as_str().map(str::to_string)
    }

    /// Waits up to `limit` until `check` holds, re-reading the page; fails naming `what`.
    pub fn wait(
        &mut self,
        limit: Duration,
        what: &str,
        mut check: impl FnMut(&mut Browser) -> bool,
    ) {
        let deadline = Instant::now() + limit;
        loop {
            if check(self) {
                return;
            }
            if Instant::now() > deadline {
                let shot = self.screenshot(&format!("timeout-{}", what.replace(' ', "-")));
                let body = self.text("body").unwrap_or_default();
                panic!(
                    "the page did not show {what} within {limit:?} (screenshot {}):\n{}",
                    shot.display(),
                    body.chars().take(3000).collect::<String>()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn element(&mut self, css: &str) -> String {
        let v = self
            .try_cmd(
                "POST",
                "element",
                json!({"using": "css selector", "value": css}),
            )
            .unwrap_or_else(|e| panic!("no element `{css}`: {e}"));
        v[ELEMENT].as_str().expect("an element id").to_string()
    }

    /// Clicks the first element matching `css` (as a user would: it must be visible).
    pub fn click(&mut self, css: &str) {
        let id = self.element(css);
        self.try_cmd("POST", &format!("element/{id}/click"), json!({}))
            .unwrap_or_else(|e| panic!("cannot click `{css}`: {e}"));
    }

    /// Types `text` into the first element matching `css`.
    pub fn type_into(&mut self, css: &str, text: &str) {
        let id = self.element(css);
        self.try_cmd(
            "POST",
            &format!("element/{id}/value"),
            json!({"text": text}),
        )
        .unwrap_or_else(|e| panic!("cannot type into `{css}`: {e}"));
    }

    /// Picks the option with `value` in the `<select>` matching `css`.
    pub fn select(&mut self, css: &str, value: &str) {
        self.click(&format!("{css} option[value=\"{value}\"]"));
    }

    /// Accepts an open `confirm()` dialog.
    pub fn accept_dialog(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.try_cmd("POST", "alert/accept", json!({})).is_err() {
            assert!(Instant::now() < deadline, "no dialog to accept");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// True when a JavaScript dialog (alert, confirm) is open.
    pub fn dialog_open(&mut self) -> bool {
        self.try_cmd("GET", "alert/text", json!({})).is_ok()
    }

    /// Forgets every cookie (logs out without the form).
    pub fn clear_cookies(&mut self) {
        self.cmd("DELETE", "cookie", json!({}));
    }

    /// Saves a PNG of the viewport as `<artefacts>/<name>.png` and returns its path.
    pub fn screenshot(&mut self, name: &str) -> PathBuf {
        let v = self.cmd("GET", "screenshot", json!({}));
        let png = base64_decode(v.as_str().unwrap_or(""));
        let dir = artefacts_dir();
        std::fs::create_dir_all(&dir).expect("the artefacts directory");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write a screenshot");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self
            .http
            .delete(format!("{}/session/{}", self.base, self.session))
            .send();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Standard base64 (WebDriver's screenshots).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let Some(v) = val(c) else { continue };
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes() {
        assert_eq!(super::base64_decode("aGVsbG8gd29ybGQ="), b"hello world");
        assert_eq!(super::base64_decode("AAEC"), [0, 1, 2]);
    }
}
