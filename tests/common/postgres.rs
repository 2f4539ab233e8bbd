//! A PostgreSQL database of its own for each test, in the cluster that
//! `CHUNKVAULT_TEST_POSTGRES` names (`eval "$(scripts/postgres.sh start)"`),
//! so tests run in parallel. Without the variable a test prints why and
//! passes; with `CHUNKVAULT_REQUIRE_POSTGRES=1` (as `.ci/run` sets) a
//! missing or unreachable cluster fails it.

/// A fresh database, dropped (with its connections) with this value.
pub struct TestDb {
    base: String,
    name: String,
    /// The database's URL, for `--registry`.
    pub url: String,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn admin(base: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(base, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// `base` with its database name replaced by `name`.
fn with_database(base: &str, name: &str) -> String {
    let (head, query) = base.split_once('?').map_or((base, None), |(h, q)| (h, Some(q)));
    let after_scheme = head.find("://").map_or(0, |i| i + 3);
    let head = match head[after_scheme..].find('/') {
        Some(i) => &head[..after_scheme + i],
        None => head,
    };
    match query {
        Some(q) => format!("{head}/{name}?{q}"),
        None => format!("{head}/{name}"),
    }
}

impl TestDb {
    /// A fresh database, or `None` with the reason printed.
    pub fn create() -> Option<TestDb> {
        let required = std::env::var("CHUNKVAULT_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
        let Ok(base) = std::env::var("CHUNKVAULT_TEST_POSTGRES") else {
            assert!(!required, "CHUNKVAULT_REQUIRE_POSTGRES=1 but CHUNKVAULT_TEST_POSTGRES is not set");
            eprintln!("skipped: set CHUNKVAULT_TEST_POSTGRES (eval \"$(scripts/postgres.sh start)\") to run this");
            return None;
        };
        let name = format!("cv_test_{}", hex::encode(rand::random::<[u8; 8]>()));
        let made =
            runtime().block_on(async { admin(&base).await?.batch_execute(&format!("CREATE DATABASE {name}")).await });
        if let Err(e) = made {
            assert!(!required, "PostgreSQL at CHUNKVAULT_TEST_POSTGRES: {e}");
            eprintln!("skipped: PostgreSQL at CHUNKVAULT_TEST_POSTGRES: {e}");
            return None;
        }
        let url = with_database(&base, &name);
        Some(TestDb { base, name, url })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let _ = runtime().block_on(async { admin(&self.base).await?.batch_execute(&sql).await });
    }
}
