//! The web console end to end, in a real browser: headless Chromium driven
//! through chromedriver (WebDriver) against a real `chunkvault serve`, with
//! the real device CLI. Sign in, create a deployment token with a policy,
//! copy its managed configuration, activate a device with it and back up,
//! see the device and its snapshot, retire it in the console and see the
//! device refused; then a tenant admin sees only its tenant and a read-only
//! token is offered no action. Screenshots of every page at 360 and 1280 px
//! go to `target/console-screenshots/`.
//!
//! Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium
//! chromium-driver`; `CHUNKVAULT_CHROMIUM` and `CHUNKVAULT_CHROMEDRIVER`
//! point elsewhere). Without them the test says so and passes, unless
//! `CHUNKVAULT_REQUIRE_BROWSER=1` (set by `.ci/run`), when it fails.
//! `CHUNKVAULT_BROWSER=firefox` runs it in Firefox instead, through
//! geckodriver (`cargo install geckodriver`; `CHUNKVAULT_GECKODRIVER`),
//! with screenshots under `target/console-screenshots/firefox/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::server::*;
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// How long any one thing may take to show up in the page.
const WAIT: Duration = Duration::from_secs(30);
/// The widths screenshots are taken at: a phone, a laptop.
const WIDTHS: [u32; 2] = [360, 1280];

/// A program from an environment variable, else the first of `paths` that exists.
fn program(var: &str, paths: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p));
    }
    paths.iter().map(PathBuf::from).find(|p| p.exists())
}

/// chromedriver on a free loopback port, stopped on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(exe: &Path, gecko: bool) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let args = if gecko {
            vec!["--host".to_owned(), "127.0.0.1".into(), "--port".into(), port.to_string()]
        } else {
            vec![format!("--port={port}"), "--allowed-ips=127.0.0.1".into()]
        };
        let child = Command::new(exe)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let driver = Driver { child, url };
        eventually(30, "chromedriver to answer", || {
            agent().get(format!("{}/status", driver.url)).call().is_ok_and(|r| r.status().as_u16() == 200)
        });
        driver
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The console in one browser session, and where its screenshots go.
struct Console {
    c: Client,
    base: String,
    shots: PathBuf,
    driver: String,
    firefox: bool,
}

impl Console {
    /// A Chrome DevTools command, through chromedriver (`goog/cdp/execute`).
    async fn cdp(&self, cmd: &str, params: Value) {
        let session = self.c.session_id().await.unwrap().expect("a session");
        let body = json!({"cmd": cmd, "params": params}).to_string();
        let (status, resp) =
            http("POST", &format!("{}/session/{session}/goog/cdp/execute", self.driver), None, Some(body.as_bytes()));
        assert_eq!(status, 200, "{cmd}: {}", String::from_utf8_lossy(&resp));
    }

    async fn js(&self, script: &str) -> Value {
        self.c.execute(script, vec![]).await.unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    /// Polls a JavaScript expression until it is true. One that throws (an
    /// element looked up while its list is being rendered again) is not
    /// true yet.
    async fn until(&self, what: &str, expr: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.js(&format!("try {{ return Boolean({expr}); }} catch (e) {{ return false; }}")).await == json!(true)
            {
                return;
            }
            if Instant::now() > deadline {
                let status = self.js("return document.getElementById('status').textContent + ' | ' + document.getElementById('error-text').textContent").await;
                panic!("timed out waiting for {what} ({expr}); notices: {status}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn find(&self, css: &str) -> Element {
        self.until(css, &format!("document.querySelector({})", json!(css))).await;
        self.c.find(Locator::Css(css)).await.unwrap()
    }

    async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.unwrap()
    }

    async fn count(&self, css: &str) -> usize {
        self.js(&format!("return document.querySelectorAll({}).length", json!(css))).await.as_u64().unwrap() as usize
    }

    /// Opens a page of the console and waits until it has loaded.
    async fn open(&self, hash: &str, ready: &str) {
        self.c.goto(&format!("{}/console/{hash}", self.base)).await.unwrap();
        self.loaded(ready).await;
    }

    async fn loaded(&self, ready: &str) {
        self.until(
            ready,
            &format!("document.querySelector({}) && !document.querySelector('main [aria-busy]')", json!(ready)),
        )
        .await;
    }

    async fn fill(&self, css: &str, value: &str) {
        let el = self.find(css).await;
        el.clear().await.unwrap();
        el.send_keys(value).await.unwrap();
    }

    async fn click(&self, css: &str) {
        self.find(css).await.click().await.unwrap();
    }

    /// Confirms the confirmation dialog, which must name `what`.
    async fn confirm(&self, what: &str) {
        self.until("the confirmation", "document.getElementById('confirm').open").await;
        let title = self.text("#confirm-title").await;
        assert!(title.contains(what), "the confirmation names {what}: {title}");
        self.click("#confirm-ok").await;
        self.until("the dialog to close", "!document.getElementById('confirm').open").await;
    }

    /// Screenshots of the current page at each width, the whole page high.
    async fn shoot(&self, name: &str) {
        // A wide screen: the page keeps to its width, nothing overflows.
        self.c.set_window_size(1920, 1000).await.unwrap();
        let (wide, inner) =
            (self.js("return document.documentElement.scrollWidth").await, self.js("return window.innerWidth").await);
        assert!(wide.as_u64() <= inner.as_u64(), "{name} at 1920 px: {wide} wide in {inner}");
        // Firefox keeps a window at least 500 px wide.
        let widths = if self.firefox { [500, 1280] } else { WIDTHS };
        for width in widths {
            self.c.set_window_size(width, 900).await.unwrap();
            let inner = self.js("return window.innerWidth").await.as_u64().unwrap();
            assert!(inner <= u64::from(width) && inner + 40 >= u64::from(width), "{name}: viewport {inner} at {width}");
            // Nothing may be wider than the screen: the page scrolls down, never sideways.
            let wide = self.js("return document.documentElement.scrollWidth").await.as_u64().unwrap();
            assert!(wide <= inner, "{name} at {width} px: the page is {wide} px wide");
            let high = self.js("return document.documentElement.scrollHeight").await.as_u64().unwrap();
            let chrome = 900 - self.js("return window.innerHeight").await.as_u64().unwrap().min(900);
            self.c.set_window_size(width, (high + chrome).clamp(600, 6000) as u32).await.unwrap();
            let png = self.c.screenshot().await.unwrap();
            std::fs::write(self.shots.join(format!("{name}-{width}.png")), png).unwrap();
        }
        self.c.set_window_size(1280, 900).await.unwrap();
    }

    async fn sign_in(&self, token: &str, role: &str) {
        self.c.goto(&format!("{}/console/", self.base)).await.unwrap();
        if self.count("#sign-out").await > 0
            && self.js("return !document.getElementById('who').hidden").await == json!(true)
        {
            self.click("#sign-out").await;
        }
        // By keyboard: the token field has the focus, Enter signs in.
        self.find("#token").await;
        self.until("the focus on the token field", "document.activeElement.id === 'token'").await;
        self.c.active_element().await.unwrap().send_keys(&format!("{token}\u{E007}")).await.unwrap();
        self.until(
            "signed in",
            &format!(
                "document.getElementById('who-role') && document.getElementById('who-role').textContent === {}",
                json!(role)
            ),
        )
        .await;
        self.loaded("#page-title").await;
    }

    /// No control that changes anything anywhere on the page.
    async fn offers_no_action(&self, page: &str) {
        let actions =
            self.count("main [data-action], main form#token-form, main form#users-form, main form.quota").await;
        assert_eq!(actions, 0, "{page}: a read-only token is offered actions");
    }
}

/// The browser the test drives: Chromium (the default, and CI's), or
/// Firefox with `CHUNKVAULT_BROWSER=firefox` (through geckodriver).
struct Browser {
    firefox: bool,
    binary: PathBuf,
    driver: PathBuf,
}

fn browser_or_skip() -> Option<Browser> {
    let firefox = std::env::var("CHUNKVAULT_BROWSER").as_deref() == Ok("firefox");
    let (binary, driver) = if firefox {
        (
            program("CHUNKVAULT_FIREFOX", &["/usr/bin/firefox-esr", "/usr/bin/firefox"]),
            program("CHUNKVAULT_GECKODRIVER", &["/usr/bin/geckodriver", "/usr/local/bin/geckodriver"]),
        )
    } else {
        (
            program(
                "CHUNKVAULT_CHROMIUM",
                &["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"],
            ),
            program("CHUNKVAULT_CHROMEDRIVER", &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]),
        )
    };
    match (binary, driver) {
        (Some(binary), Some(driver)) => Some(Browser { firefox, binary, driver }),
        _ if std::env::var("CHUNKVAULT_REQUIRE_BROWSER").as_deref() == Ok("1") => {
            panic!("CHUNKVAULT_REQUIRE_BROWSER=1 but the browser or its WebDriver is missing (apt-get install chromium chromium-driver)")
        }
        _ => {
            eprintln!("skipped: no chromium and chromedriver (apt-get install chromium chromium-driver); CI sets CHUNKVAULT_REQUIRE_BROWSER=1");
            None
        }
    }
}

#[test]
fn the_console_runs_a_fleet_in_a_real_browser() {
    let Some(browser) = browser_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    let driver = Driver::start(&browser.driver, browser.firefox);
    let mut shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("console-screenshots");
    if browser.firefox {
        shots.push("firefox");
    }
    std::fs::create_dir_all(&shots).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut caps = serde_json::Map::new();
        if browser.firefox {
            caps.insert(
                "moz:firefoxOptions".into(),
                json!({"binary": browser.binary, "args": ["-headless", "-width=1280", "-height=900"]}),
            );
        } else {
            caps.insert(
                "goog:chromeOptions".into(),
                json!({
                    "binary": browser.binary,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--window-size=1280,900", "--force-device-scale-factor=1", "--lang=en-US",
                             "--no-first-run", "--no-default-browser-check"],
                }),
            );
        }
        let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url)
            .await
            .expect("a WebDriver session");
        let console =
            Console { c, base: server.url.clone(), shots, driver: driver.url.clone(), firefox: browser.firefox };
        scenario(&console, &server.url, dir.path()).await;
        console.c.close().await.unwrap();
    });
}

async fn scenario(b: &Console, url: &str, dir: &Path) {
    // The sign-in page, and a wrong token's error from the API.
    b.c.goto(&format!("{url}/console/")).await.unwrap();
    b.find("#token").await;
    b.shoot("sign-in").await;
    b.fill("#token", "not the token").await;
    b.click("#sign-in-button").await;
    b.until("the API's error", "!document.getElementById('error').hidden").await;
    let error = b.text("#error-text").await;
    assert!(error.contains("unknown or malformed token (invalid_token, HTTP 401)"), "the API's message: {error}");
    assert_eq!(b.js("return sessionStorage.length").await, json!(0), "a refused token is not kept");

    b.sign_in(ADMIN, "admin").await;
    assert!(b.c.current_url().await.unwrap().query().is_none(), "the token never goes in a URL");
    let kept = b.js("return Object.values(sessionStorage)").await;
    assert_eq!(kept, json!([ADMIN]), "the token is kept in sessionStorage");
    assert_eq!(b.js("return document.cookie").await, json!(""));

    // A deployment token for acme with a policy, and its managed config.
    b.open("#/tokens", "#token-form").await;
    b.fill("#token-form input[name=tenant]", "acme").await;
    b.fill("#token-form input[name=max_activations]", "5").await;
    b.click("#token-form input[name=allowRestoreToOtherDevice]").await;
    b.shoot("tokens").await;
    b.click("#create-token").await;
    let created = b.text("#created-token").await;
    assert!(created.starts_with("cvdt_"), "{created}");
    let shown_json = b.text("#created-json").await;
    let plist = b.text("#created-plist").await;
    // Copy it as an administrator would, and take it from the clipboard
    // (Firefox lets no page read the clipboard: there, what was shown).
    if !b.firefox {
        b.cdp("Browser.grantPermissions", json!({"permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]}))
            .await;
    }
    b.click("[data-copy=json]").await;
    b.until("the copy", "document.querySelector('[data-copy=json]').textContent === 'Copied'").await;
    let copied = if b.firefox {
        shown_json.clone()
    } else {
        let read = "const done = arguments[0]; navigator.clipboard.readText().then(done, e => done('refused: ' + e));";
        b.c.execute_async(read, vec![]).await.unwrap().as_str().unwrap().to_owned()
    };
    assert_eq!(copied, shown_json, "the clipboard holds the managed configuration");
    b.shoot("token-created").await;
    let mut config: Value = serde_json::from_str(&copied).unwrap();
    assert_eq!(config["serverURL"], url);
    assert_eq!(config["deploymentToken"], created.as_str());
    assert_eq!(
        (config["allowRestoreToOtherDevice"].as_bool(), config["allowOpenIn"].as_bool()),
        (Some(false), Some(true))
    );
    assert!(plist.starts_with("<dict>") && plist.trim_end().ends_with("</dict>"), "{plist}");
    assert!(plist.contains(&format!("<key>deploymentToken</key>\n    <string>{created}</string>")), "{plist}");
    assert!(plist.contains("<key>allowRestoreToOtherDevice</key>\n    <false/>"), "{plist}");
    let listed = b.text("#token-list").await;
    assert!(listed.contains("0 / 5") && listed.contains("no restore to other devices"), "{listed}");

    // The MDM fills in the user's email; the device activates and backs up.
    config["userEmail"] = json!("ann@acme.com");
    config["deviceId"] = json!("ann-phone");
    let managed = dir.join("managed.json");
    std::fs::write(&managed, config.to_string()).unwrap();
    let dev = Dev { state: dir.join("ann-state") };
    ok(run(&mut dev.cmd(&["activate", "--managed-config", managed.to_str().unwrap()])));
    let data = dir.join("data");
    make_data(&data, 1);
    dev.backup(&data);
    // Its work done, the token is revoked in the console: it activates no more.
    b.open("#/tokens", "#token-list table").await;
    let id = b.find("[data-action=revoke]").await.attr("data-token").await.unwrap().unwrap();
    b.click("[data-action=revoke]").await;
    b.confirm(&id).await;
    b.until("the revoke", "document.querySelector('#token-list td[data-label=State]').textContent === 'revoked'").await;
    let again = dir.join("again.json");
    config["deviceId"] = json!("another-phone");
    std::fs::write(&again, config.to_string()).unwrap();
    let other = Dev { state: dir.join("another-state") };
    let out = run(&mut other.cmd(&["activate", "--managed-config", again.to_str().unwrap()]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("token_revoked"), "{}", String::from_utf8_lossy(&out.stderr));

    // The device and its snapshot in the console.
    b.open("#/devices", "#device-list table").await;
    let row = b.text("#device-list tbody tr").await;
    assert!(row.contains("ann-phone") && row.contains("ann@acme.com") && row.contains("active"), "{row}");
    assert_eq!(b.text("#device-list td[data-label=Snapshots]").await, "1");
    b.shoot("devices").await;
    b.click("#device-list a[href='#/device/ann-phone']").await;
    b.loaded("#page-title").await;
    b.until("the snapshot", "document.querySelectorAll('main tbody tr').length === 1").await;
    assert_eq!(b.text("main td[data-label=Files]").await, "3");
    assert_eq!(b.text("main td[data-label=Size]").await, "684.4 KiB");
    b.shoot("device").await;

    // Tenants, and a tenant's charts.
    b.open("#/tenants", "main table").await;
    let acme = b.text("main tbody tr").await;
    assert!(acme.contains("acme") && acme.contains("no quota"), "{acme}");
    b.shoot("tenants").await;
    b.open("#/tenant/acme", "[data-chart=bar] svg").await;
    assert_eq!(b.count("[data-chart=bar] rect.bar").await, 30);
    let today = b.js("const bars = document.querySelectorAll('[data-chart=bar] rect.bar'); return bars[bars.length - 1].textContent").await;
    assert!(today.as_str().unwrap().ends_with(": 1 backup"), "{today}");
    assert!(b.count("[data-chart=line] circle.dot").await >= 1);
    b.fill("main form.quota input[name=quota]", "2").await;
    b.click("main form.quota button").await;
    b.until("the quota", "document.querySelector('main meter')").await;
    b.shoot("tenant").await;

    // Users: pasted, uploaded as CSV, and one removed.
    b.open("#/users?tenant=acme", "#users-form").await;
    b.fill("#users-form textarea", "bob@acme.com, carol@acme.com\nnot-an-email").await;
    assert!(b.text("#users-preview").await.starts_with("2 addresses to add; not addresses, left out: not-an-email"));
    b.click("#add-users").await;
    b.until(
        "two users",
        "document.getElementById('user-count') && document.getElementById('user-count').textContent === '2 users'",
    )
    .await;
    let csv = dir.join("users.csv");
    std::fs::write(&csv, "email,name\ndave@acme.com,Dave\n\"erin@acme.com\",Erin\nbob@acme.com,Bob again\n").unwrap();
    b.find("#users-form input[type=file]").await.send_keys(csv.to_str().unwrap()).await.unwrap();
    b.until("the CSV", "document.getElementById('users-preview').textContent.startsWith('3 addresses')").await;
    b.click("#add-users").await;
    b.until(
        "four users",
        "document.getElementById('user-count') && document.getElementById('user-count').textContent === '4 users'",
    )
    .await;
    b.click("[data-action=remove-user][data-email='bob@acme.com']").await;
    b.confirm("bob@acme.com").await;
    b.until(
        "three users",
        "document.getElementById('user-count') && document.getElementById('user-count').textContent === '3 users'",
    )
    .await;
    // Escape cancels a confirmation, and nothing happens.
    b.click("[data-action=remove-user][data-email='carol@acme.com']").await;
    b.until("the confirmation", "document.getElementById('confirm').open").await;
    b.c.active_element().await.unwrap().send_keys("\u{E00C}").await.unwrap();
    b.until("the dialog to close", "!document.getElementById('confirm').open").await;
    assert_eq!(b.text("#user-count").await, "3 users");
    b.shoot("users").await;

    b.open("#/nodes", "main table").await;
    assert!(b.text("main tbody tr").await.contains("current"));
    b.shoot("nodes").await;

    // Retire the device in the console; its next CLI call is refused and
    // it clears its state.
    b.open("#/devices?q=ann", "#device-list table").await;
    b.click("[data-action=retire][data-device=ann-phone]").await;
    b.confirm("ann-phone").await;
    b.until("the retire", "document.querySelector('#device-list td[data-label=State]').textContent === 'retired'")
        .await;
    let out = run(&mut dev.cmd(&["backup", data.to_str().unwrap()]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("device_retired"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dev.state.exists(), "a retired device clears its state");
    // A retired device may leave the registry.
    b.click("[data-action=delete][data-device=ann-phone]").await;
    b.confirm("ann-phone").await;
    b.until("the deletion", "document.getElementById('device-count').textContent.startsWith('Showing 0 of 0')").await;

    b.open("#/audit", "#audit-list table").await;
    let audit = b.text("#audit-list tbody tr").await;
    assert!(
        audit.contains("delete") && audit.contains("ann-phone") && audit.contains("bootstrap"),
        "newest first: {audit}"
    );
    b.shoot("audit").await;
    b.find("main select[name=action]").await.select_by_value("retire").await.unwrap();
    b.until("the action filter", "document.getElementById('audit-count').textContent.startsWith('1 entry')").await;

    // A tenant admin sees its tenant only.
    let globex = deployment_token(url, "globex");
    Dev::activate(dir, url, &globex, "gus@globex.com", "gus-phone");
    let bob = Dev::activate(dir, url, &deployment_token(url, "acme"), "bob@acme.com", "bob-phone");
    bob.backup(&data);
    let tenant_admin = token_of(url, json!({"role": "tenant-admin", "tenant": "acme"}));
    b.sign_in(&tenant_admin, "tenant-admin").await;
    b.loaded("main table").await;
    assert_eq!(b.count("main tbody tr").await, 1);
    assert!(b.text("main tbody tr").await.contains("acme"));
    assert!(
        b.js("return document.getElementById('nav-nodes').hidden").await == json!(true),
        "no storage nodes for one tenant"
    );
    b.open("#/devices", "#device-list table").await;
    let rows = b.text("#device-list tbody").await;
    assert!(rows.contains("bob-phone") && !rows.contains("gus-phone"), "{rows}");
    b.open("#/tokens", "#token-form").await;
    assert_eq!(b.find("#token-form input[name=tenant]").await.prop("readOnly").await.unwrap().as_deref(), Some("true"));
    assert!(!b.text("#token-list").await.contains("globex"));
    b.open("#/audit", "#audit-list table").await;
    assert!(!b.text("#audit-list").await.contains("globex"));

    // A read-only token is offered nothing that changes anything.
    let read_only = token_of(url, json!({"role": "read-only"}));
    b.sign_in(&read_only, "read-only").await;
    for (page, ready) in [
        ("#/tenants", "main table"),
        ("#/tenant/acme", "[data-chart=bar] svg"),
        ("#/tokens", "#token-list"),
        ("#/users?tenant=acme", "#user-count"),
        ("#/devices", "#device-list table"),
        ("#/device/bob-phone", "main tbody tr"),
        ("#/nodes", "main table"),
        ("#/audit", "#audit-list table"),
    ] {
        b.open(page, ready).await;
        b.offers_no_action(page).await;
    }

    // Signing out forgets the token.
    b.click("#sign-out").await;
    b.find("#token").await;
    assert_eq!(b.js("return sessionStorage.length").await, json!(0));
}

/// A new admin token's secret.
fn token_of(url: &str, body: Value) -> String {
    let (status, resp) =
        http("POST", &format!("{url}/v1/admin/tokens"), Some(ADMIN), Some(body.to_string().as_bytes()));
    assert_eq!(status, 200);
    serde_json::from_slice::<Value>(&resp).unwrap()["token"].as_str().unwrap().to_owned()
}
