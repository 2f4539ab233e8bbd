//! Device authorization: token formats ([`token`]) and the device registry
//! ([`registry`], SQLite), and administrators' roles and scopes ([`admin`]).
//! ARCHITECTURE.md explains the flow and threat model.

pub mod admin;
#[cfg(feature = "server")]
pub mod registry;
pub mod token;

use std::fmt;
use std::str::FromStr;

/// Where a device stands with its tenant's administrator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceState {
    /// In good standing: may open sessions and back up.
    Active,
    /// Non-compliant: no new sessions; storage refuses it after check-in.
    Blocked,
    /// Logged out for good: tokens stop working, the client clears its state.
    Retired,
    /// Retired, and the client also deletes what it restored.
    Wiped,
    /// Released by the admin: its tokens and sessions stop working, and the
    /// device id may be activated again (the only state that allows it).
    Reset,
}

impl DeviceState {
    /// The lowercase name the registry stores and the API sends
    /// (`active`, `blocked`, `retired`, `wiped`, `reset`); [`FromStr`] parses it back.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Active => "active",
            DeviceState::Blocked => "blocked",
            DeviceState::Retired => "retired",
            DeviceState::Wiped => "wiped",
            DeviceState::Reset => "reset",
        }
    }

    /// The API error code a request from a device in this state gets.
    pub fn error_code(self) -> Option<&'static str> {
        match self {
            DeviceState::Active => None,
            DeviceState::Blocked => Some("device_blocked"),
            DeviceState::Retired => Some("device_retired"),
            DeviceState::Wiped => Some("device_wiped"),
            DeviceState::Reset => Some("device_reset"),
        }
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeviceState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "active" => DeviceState::Active,
            "blocked" => DeviceState::Blocked,
            "retired" => DeviceState::Retired,
            "wiped" => DeviceState::Wiped,
            "reset" => DeviceState::Reset,
            other => return Err(format!("unknown device state {other:?}")),
        })
    }
}
