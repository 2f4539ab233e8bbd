//! What a storage node knows of device states, so already-issued session
//! tokens stop working when a device is retired, blocked or wiped. In the
//! `all` role the auth side updates it directly; a storage node polls the auth
//! role's check-in feed (`POST /v1/checkin`, which also carries up its
//! tenants' stored bytes, the node itself and what changed in its tenants'
//! snapshots ([`super::catalog`]), and every tenant's quota down) and
//! applies `auth_unreachable` when it can't.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::error::HttpError;
use super::{App, AuthUnreachable};
use crate::api::{CheckinRequest, CheckinResponse, DeviceChange};
use crate::auth::DeviceState;

pub struct DeviceStates {
    /// Devices that are not active; absent means active.
    states: RwLock<HashMap<String, DeviceState>>,
    /// Per device id, the lowest generation whose sessions are valid: a
    /// reset moves it on, so sessions of the earlier activation stay void
    /// after the id activates again.
    generations: RwLock<HashMap<String, u32>>,
    cursor: AtomicU64,
    /// When a check-in last succeeded; `None` in the `all` role (no check-in).
    last_ok: Option<Mutex<Instant>>,
    policy: AuthUnreachable,
    interval: Duration,
}

impl DeviceStates {
    pub fn new(local: bool, policy: AuthUnreachable, interval: Duration) -> Self {
        DeviceStates {
            states: RwLock::default(),
            generations: RwLock::default(),
            cursor: AtomicU64::new(0),
            last_ok: (!local).then(|| Mutex::new(Instant::now())),
            policy,
            interval,
        }
    }

    /// True when the auth role is in this process (nothing to poll).
    pub fn is_local(&self) -> bool {
        self.last_ok.is_none()
    }

    /// Applies state changes, from the registry or the check-in feed.
    pub fn apply(&self, changes: &[DeviceChange]) {
        let mut states = self.states.write().expect("states lock");
        let mut generations = self.generations.write().expect("generations lock");
        for c in changes {
            if let Some(g) = c.generation {
                let min = generations.entry(c.device_id.clone()).or_default();
                *min = (*min).max(g);
            }
            match DeviceState::from_str(&c.state) {
                // A reset's generation (above) voids the earlier sessions by
                // itself; leaving no state lets the id's next activation work
                // here before the next check-in brings its `active` change.
                Ok(DeviceState::Active | DeviceState::Reset) => {
                    states.remove(&c.device_id);
                }
                Ok(s) => {
                    states.insert(c.device_id.clone(), s);
                }
                Err(e) => tracing::warn!("check-in: {e}"),
            }
        }
    }

    /// Refuses a device that is not active, a session of an activation
    /// before the device's last reset (`generation` from the session token),
    /// or anyone when the auth role has been unreachable for two intervals
    /// and the policy is fail-closed.
    pub fn check(&self, device: &str, generation: u32) -> Result<(), HttpError> {
        if let Some(state) = self.states.read().expect("states lock").get(device) {
            return Err(HttpError::device_refused(*state, format!("device is {state}")));
        }
        if self.generations.read().expect("generations lock").get(device).is_some_and(|&min| generation < min) {
            return Err(HttpError::device_refused(
                DeviceState::Reset,
                "this session belongs to an activation the admin reset",
            ));
        }
        if let Some(last_ok) = &self.last_ok {
            let stale = last_ok.lock().expect("checkin lock").elapsed() > 2 * self.interval;
            if stale && self.policy == AuthUnreachable::FailClosed {
                return Err(HttpError::auth_unreachable());
            }
        }
        Ok(())
    }

    /// Records a successful check-in (or registry poll) up to `cursor`.
    pub(super) fn checked_in(&self, cursor: u64) {
        self.cursor.store(cursor, Ordering::Relaxed);
        if let Some(last_ok) = &self.last_ok {
            *last_ok.lock().expect("checkin lock") = Instant::now();
        }
    }
}

/// Polls the auth role's check-in feed every interval, forever.
pub async fn poll_upstream(app: Arc<App>) {
    let Some(storage) = app.storage.as_ref() else { return };
    let upstream = app.config.upstream.clone().unwrap_or_default();
    let token = app.admin_token.clone().map(|t| String::from_utf8_lossy(&t).into_owned());
    let mut ticker = tokio::time::interval(storage.states.interval);
    loop {
        ticker.tick().await;
        let url = format!("{}/v1/checkin", upstream.trim_end_matches('/'));
        let token = token.clone();
        let app2 = app.clone();
        let fetched = tokio::task::spawn_blocking(move || -> Result<CheckinResponse, String> {
            let storage = app2.storage.as_ref().ok_or("no storage role")?;
            // What this node's tenants store, the node itself and what
            // changed in its tenants' snapshots go up with the request.
            let usage = storage.quotas.report();
            let due = storage.quotas.recently_touched(super::catalog::RECHECK);
            let (fetched, _) = storage.catalog.report(due, |snapshots| {
                let body = CheckinRequest {
                    since: storage.states.cursor.load(Ordering::Relaxed),
                    usage,
                    node: Some(super::fleet::node_report(&app2)),
                    snapshots,
                };
                let mut req = app2.upstream.post(&url).config().timeout_global(Some(Duration::from_secs(10))).build();
                if let Some(t) = &token {
                    req = req.header("Authorization", &format!("Bearer {t}"));
                }
                let mut resp =
                    req.send_json(&body).map_err(|e| crate::tls::explain(&e, super::HOW_TO_TRUST_UPSTREAM))?;
                if resp.status().as_u16() >= 400 {
                    return Err(format!("the auth server answered {}", resp.status()));
                }
                resp.body_mut().read_json::<CheckinResponse>().map_err(|e| e.to_string())
            });
            fetched
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        match fetched {
            Ok(feed) => {
                storage.states.apply(&feed.changes);
                storage.quotas.set_all(&feed.quotas);
                storage.states.checked_in(feed.cursor);
            }
            Err(e) => {
                app.metrics.checkin_failures.inc();
                tracing::warn!("check-in with {upstream} failed: {e}");
            }
        }
    }
}

/// In the `all` role on a registry that other auth nodes share
/// (PostgreSQL), follows the registry's feed every interval, as a storage
/// node's check-in does: a device retired through another node is refused
/// here too, and quotas set there apply.
pub async fn poll_registry(app: Arc<App>) {
    let Some(storage) = app.storage.as_ref() else { return };
    let mut ticker = tokio::time::interval(storage.states.interval);
    loop {
        ticker.tick().await;
        let app2 = app.clone();
        let polled = tokio::task::spawn_blocking(move || {
            let (auth, storage) = (app2.auth()?, app2.storage()?);
            let (cursor, changes) =
                auth.registry.changes_since(storage.states.cursor.load(Ordering::Relaxed), 10_000)?;
            Ok::<_, HttpError>((cursor, changes, auth.registry.quotas()?))
        })
        .await;
        match polled {
            Ok(Ok((cursor, changes, quotas))) => {
                storage.states.apply(&changes);
                storage.quotas.set_all(&quotas);
                storage.states.checked_in(cursor);
            }
            Ok(Err(e)) => tracing::warn!("following the registry's feed failed: {}", e.message),
            Err(e) => tracing::warn!("following the registry's feed failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(state: &str) -> DeviceChange {
        DeviceChange { device_id: "d".into(), tenant: "t".into(), state: state.into(), generation: None }
    }

    #[test]
    fn states_block_and_allow() {
        let s = DeviceStates::new(true, AuthUnreachable::FailClosed, Duration::from_secs(1));
        s.check("d", 1).unwrap();
        s.apply(&[change("wiped")]);
        assert_eq!(s.check("d", 1).unwrap_err().code, "device_wiped");
        s.apply(&[change("blocked"), change("active")]);
        s.check("d", 1).unwrap();
    }

    #[test]
    fn a_reset_voids_sessions_of_earlier_activations_for_good() {
        let s = DeviceStates::new(true, AuthUnreachable::FailClosed, Duration::from_secs(1));
        let with = |state: &str, g| DeviceChange { generation: Some(g), ..change(state) };
        s.apply(&[change("retired"), with("reset", 2)]);
        assert_eq!(s.check("d", 1).unwrap_err().code, "device_reset");
        // The next activation's sessions work before its change arrives.
        s.check("d", 2).unwrap();
        s.apply(&[with("active", 2)]);
        assert_eq!(s.check("d", 1).unwrap_err().code, "device_reset");
        s.check("d", 2).unwrap();
        // Changes without a generation never lower it; other devices are unaffected.
        s.apply(&[change("blocked"), change("active")]);
        assert!(s.check("d", 1).is_err());
        s.check("other", 0).unwrap();
    }

    #[test]
    fn stale_checkin_fails_closed_or_open() {
        let closed = DeviceStates::new(false, AuthUnreachable::FailClosed, Duration::ZERO);
        assert_eq!(closed.check("d", 1).unwrap_err().code, "auth_unreachable");
        let open = DeviceStates::new(false, AuthUnreachable::FailOpen, Duration::ZERO);
        open.check("d", 1).unwrap();
    }
}
