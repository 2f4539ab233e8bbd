//! The OpenAPI document a running server serves is the one committed as
//! `docs/openapi.json`, so a change to a route or a body type shows up in
//! review. After such a change, regenerate the file with
//! `UPDATE_OPENAPI=1 cargo nextest run --test openapi`.

mod common;

use common::server::*;

#[test]
fn served_openapi_document_matches_docs_openapi_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("root"), &[]);
    // Served without a token, as JSON.
    let resp = agent().get(format!("{}/v1/openapi.json", server.url)).call().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let served = resp.into_body().read_to_string().unwrap();
    let doc: serde_json::Value = serde_json::from_str(&served).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");

    let committed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&committed, &served).unwrap();
    }
    let on_disk = std::fs::read_to_string(&committed).unwrap_or_default();
    assert!(
        on_disk == served,
        "docs/openapi.json differs from what the server serves at /v1/openapi.json; if the API change is \
         meant, regenerate it with `UPDATE_OPENAPI=1 cargo nextest run --test openapi` and commit it"
    );
}
