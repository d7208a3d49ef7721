//! A headless Chromium driven over the W3C WebDriver protocol (plain HTTP
//! to Debian's `chromedriver`): enough to load a page, read what it shows,
//! fill a form, click, resize and take a screenshot. The browser is
//! installed by `deploy/local/browser.sh` when missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::workspace_root;

/// The W3C key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A running chromedriver and one browser session; both stop on drop.
pub struct Browser {
    driver: Child,
    base: String,
    http: reqwest::Client,
}

/// One element of the current page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Browser {
    /// Installs Chromium when missing, starts chromedriver on a free port
    /// and a headless session with a `width`×`height` window.
    pub async fn start(width: u32, height: u32) -> anyhow::Result<Browser> {
        let out = Command::new(workspace_root().join("deploy/local/browser.sh"))
            .stderr(Stdio::inherit())
            .output()
            .context("running deploy/local/browser.sh")?;
        if !out.status.success() {
            bail!("deploy/local/browser.sh failed: Chromium is needed for this test");
        }
        let paths = String::from_utf8_lossy(&out.stdout);
        let mut lines = paths.lines();
        let chromium = lines.next().context("no chromium path")?.to_owned();
        let chromedriver = lines.next().context("no chromedriver path")?.to_owned();
        let port = dlrflow_testkit::free_port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {chromedriver}"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let root = format!("http://127.0.0.1:{port}");
        let up = dlrflow_testkit::wait_for(Duration::from_secs(30), || async {
            http.get(format!("{root}/status")).send().await.ok()
        })
        .await;
        let mut b = Browser {
            driver,
            base: root.clone(),
            http,
        };
        if up.is_none() {
            bail!("chromedriver did not answer on {root} within 30 s");
        }
        let session = b
            .call(
                reqwest::Method::POST,
                "/session",
                Some(json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": chromium,
                        "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                 "--disable-dev-shm-usage", "--hide-scrollbars",
                                 format!("--window-size={width},{height}")]
                    }
                }}})),
            )
            .await?;
        let id = session["sessionId"]
            .as_str()
            .context("no session id")?
            .to_owned();
        b.base = format!("{root}/session/{id}");
        b.resize(width, height).await?;
        Ok(b)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            req = req.json(&body);
        } else if method == reqwest::Method::POST {
            req = req.json(&json!({}));
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        let v: Value = resp
            .json()
            .await
            .with_context(|| format!("{method} {url}"))?;
        if !status.is_success() {
            bail!("{method} {url}: {status}: {}", v["value"]);
        }
        Ok(v.get("value").cloned().unwrap_or(v))
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await
            .map(drop)
    }

    pub async fn url(&self) -> anyhow::Result<String> {
        Ok(self
            .call(reqwest::Method::GET, "/url", None)
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    pub async fn resize(&self, width: u32, height: u32) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await
        .map(drop)
    }

    /// The elements matching a CSS selector (none: empty).
    pub async fn find_all(&self, css: &str) -> anyhow::Result<Vec<Element>> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT].as_str().map(|s| Element(s.to_owned())))
            .collect())
    }

    pub async fn find(&self, css: &str) -> anyhow::Result<Element> {
        self.find_all(css)
            .await?
            .into_iter()
            .next()
            .with_context(|| format!("no element matches {css}"))
    }

    /// Waits (up to 20 s) for an element matching `css`: after a click that
    /// submits a form, the next page may not be there yet.
    pub async fn wait_for(&self, css: &str) -> anyhow::Result<Element> {
        dlrflow_testkit::wait_for(Duration::from_secs(20), || async {
            self.find_all(css).await.ok()?.into_iter().next()
        })
        .await
        .with_context(|| format!("no element matches {css} within 20 s"))
    }

    /// Waits (up to 20 s) until the page's URL ends with `suffix`; returns it.
    pub async fn wait_url(&self, suffix: &str) -> anyhow::Result<String> {
        let found = dlrflow_testkit::wait_for(Duration::from_secs(20), || async {
            self.url().await.ok().filter(|u| u.ends_with(suffix))
        })
        .await;
        match found {
            Some(url) => Ok(url),
            None => bail!(
                "the page is {}, not …{suffix}, after 20 s",
                self.url().await?
            ),
        }
    }

    /// The rendered text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        let e = self.find(css).await?;
        self.text_of(&e).await
    }

    pub async fn text_of(&self, e: &Element) -> anyhow::Result<String> {
        Ok(self
            .call(
                reqwest::Method::GET,
                &format!("/element/{}/text", e.0),
                None,
            )
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    pub async fn attribute(&self, e: &Element, name: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .call(
                reqwest::Method::GET,
                &format!("/element/{}/attribute/{name}", e.0),
                None,
            )
            .await?
            .as_str()
            .map(str::to_owned))
    }

    /// The number an element shows (e.g. `<b data-k="delivered">12</b>`).
    pub async fn number(&self, css: &str) -> anyhow::Result<i64> {
        let t = self.text(css).await?;
        t.trim()
            .trim_end_matches('+')
            .parse()
            .with_context(|| format!("{css} shows {t:?}, not a number"))
    }

    pub async fn click(&self, e: &Element) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{}/click", e.0),
            None,
        )
        .await
        .map(drop)
    }

    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let e = self.find(css).await?;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{}/value", e.0),
            Some(json!({"text": text})),
        )
        .await
        .map(drop)
    }

    /// Runs `script` (a function body) in the page and returns its value.
    pub async fn eval(&self, script: &str) -> anyhow::Result<Value> {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Whether the page is wider than the window (a horizontal scrollbar on
    /// the page itself; tables scroll inside their own boxes).
    pub async fn overflows_horizontally(&self) -> anyhow::Result<bool> {
        Ok(self
            .eval("return document.documentElement.scrollWidth > window.innerWidth + 1;")
            .await?
            .as_bool()
            .unwrap_or(true))
    }

    /// Saves a PNG of the window to `path`.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<PathBuf> {
        use base64::Engine;
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().context("no screenshot")?)
            .context("screenshot is not base64")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(path.to_owned())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session (which closes Chromium), then stops the driver:
        // a plain HTTP/1.1 DELETE, as Drop cannot wait on the async client.
        use std::io::{Read, Write};
        if let Some(rest) = self.base.strip_prefix("http://") {
            if let Some((host, path)) = rest.split_once('/') {
                if let Ok(mut s) = std::net::TcpStream::connect(host) {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let _ = write!(
                        s,
                        "DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = s.read(&mut [0u8; 512]);
                }
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
