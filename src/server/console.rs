//! The web management console (auth role), at `/console/`: plain HTML, CSS
//! and JavaScript under `console/` in the source tree, built into the
//! binary, so nothing is needed to build or run it but the Rust toolchain.
//!
//! The console is a client of the JSON admin API like the CLI: it adds no
//! route that does anything, and the admin token it signs in with stays in
//! the tab's `sessionStorage`. Its responses carry a strict
//! Content-Security-Policy (no inline script or style, no other origin, no
//! framing, no form posts), `X-Frame-Options: DENY` and `Referrer-Policy:
//! no-referrer`.

use std::sync::Arc;

use axum::extract::Path;
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::error::HttpError;
use super::App;

/// Where the page may load from and send to: itself only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// One file of the console.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// Every file of the console, built in.
const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../console/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../console/app.js"),
    },
    Asset { name: "app.css", content_type: "text/css; charset=utf-8", body: include_bytes!("../../console/app.css") },
    Asset { name: "icon.svg", content_type: "image/svg+xml", body: include_bytes!("../../console/icon.svg") },
];

/// The console's routes (auth role).
pub(super) fn routes() -> Router<Arc<App>> {
    Router::new().route("/console", get(index)).route("/console/", get(index)).route("/console/{file}", get(file))
}

async fn index() -> Response {
    serve(&ASSETS[0])
}

async fn file(Path(name): Path<String>) -> Result<Response, HttpError> {
    let asset = ASSETS.iter().find(|a| a.name == name).ok_or_else(|| HttpError::not_found("no such console file"))?;
    Ok(serve(asset))
}

/// An asset with its content type and the console's security headers.
fn serve(asset: &Asset) -> Response {
    let headers: [(HeaderName, HeaderValue); 7] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type)),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY)),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin")),
    ];
    (headers, asset.body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(name: &str) -> &'static str {
        let asset = ASSETS.iter().find(|a| a.name == name).unwrap();
        std::str::from_utf8(asset.body).unwrap()
    }

    #[test]
    fn the_page_loads_only_built_in_files_and_has_no_inline_script_or_style() {
        let html = text("index.html");
        for attr in ["src=\"", "href=\""] {
            for part in html.split(attr).skip(1) {
                let target = part.split('"').next().unwrap();
                if target.starts_with('#') {
                    continue;
                }
                let name = target.strip_prefix("/console/").unwrap_or_else(|| panic!("{target} is not a console file"));
                assert!(ASSETS.iter().any(|a| a.name == name), "{target} is not built in");
            }
        }
        // A strict policy would refuse these anyway; keep them out so the
        // page works under it.
        assert!(!html.contains("style=") && !html.contains("<style"), "inline style");
        assert!(html.matches("<script").count() == html.matches("<script src=").count(), "inline script");
        for part in html.split(" on").skip(1) {
            let name: String = part.chars().take_while(char::is_ascii_lowercase).collect();
            assert!(!part[name.len()..].starts_with('='), "inline handler on{name}");
        }
        let js = text("app.js");
        for banned in
            ["innerHTML", "outerHTML", "insertAdjacentHTML", "eval(", "new Function", "document.write", "localStorage"]
        {
            assert!(!js.contains(banned), "app.js uses {banned}");
        }
    }

    #[test]
    fn the_policy_allows_nothing_inline_or_from_elsewhere() {
        let p = CONTENT_SECURITY_POLICY;
        assert!(p.starts_with("default-src 'none';"));
        assert!(!p.contains("unsafe") && !p.contains("http") && !p.contains('*'));
        for d in ["frame-ancestors 'none'", "form-action 'none'", "base-uri 'none'", "script-src 'self'"] {
            assert!(p.contains(d), "{d}");
        }
    }
}
