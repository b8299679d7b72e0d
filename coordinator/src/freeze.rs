//! When new hosts may not start: an operator's freeze (`baton freeze`,
//! stored at [`KEY`] so every coordinator of an HA group sees it), and the
//! deployment windows and fixed freezes of `batond`'s config. While one
//! holds, new rollouts wait in `pending` and running ones start no new
//! host (hosts already activating finish); the wait does not count against
//! `progress_deadline`.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Where an operator's freeze is stored.
pub const KEY: &str = "freeze";
/// The longest reason kept.
pub const MAX_REASON_CHARS: usize = 256;
/// The furthest ahead a freeze may end.
pub const MAX_AHEAD: Duration = Duration::from_secs(366 * 24 * 3600);
/// The most windows and freezes in a config.
pub const MAX_ENTRIES: usize = 64;

/// An operator's freeze.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freeze {
    /// When it ends by itself (`None`: at `unfreeze`).
    #[serde(default, with = "humantime_serde")]
    pub until: Option<SystemTime>,
    /// Why.
    #[serde(default)]
    pub reason: String,
    /// Who froze.
    pub by: String,
    /// When.
    #[serde(with = "humantime_serde")]
    pub since: SystemTime,
}

impl Freeze {
    /// Whether it holds at `now`.
    pub fn holds(&self, now: SystemTime) -> bool {
        self.until.is_none_or(|u| now < u)
    }
}

/// The freeze as an operator sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FreezeView {
    /// The operator's freeze, if one holds.
    pub freeze: Option<Freeze>,
    /// Why new hosts are held now.
    pub held: Option<String>,
}

/// A weekly deployment window, in UTC: `mon-fri 09:00-17:00`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Monday first.
    days: [bool; 7],
    /// Minutes after midnight.
    from: u32,
    to: u32,
    text: String,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day(text: &str) -> Option<usize> {
    DAYS.iter().position(|d| text.eq_ignore_ascii_case(d))
}

fn minutes(text: &str) -> Option<u32> {
    let (h, m) = text.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
}

impl Window {
    /// Parses `DAYS HH:MM-HH:MM`, DAYS being `daily`, a day (`sat`), a
    /// range (`mon-fri`) or a list (`mon,wed,fri`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "deploy-window {}: {why}; write e.g. \"mon-fri 09:00-17:00\" (UTC)",
                baton_common::text::quote(text)
            )
        };
        let (days_text, hours) = text
            .trim()
            .split_once(' ')
            .ok_or_else(|| bad("expected days, a space and hours"))?;
        let mut days = [false; 7];
        if days_text.eq_ignore_ascii_case("daily") {
            days = [true; 7];
        } else {
            for part in days_text.split(',') {
                match part.split_once('-') {
                    Some((a, b)) => {
                        let (a, b) = (
                            day(a).ok_or_else(|| bad("unknown day"))?,
                            day(b).ok_or_else(|| bad("unknown day"))?,
                        );
                        let mut d = a;
                        loop {
                            days[d] = true;
                            if d == b {
                                break;
                            }
                            d = (d + 1) % 7;
                        }
                    }
                    None => days[day(part).ok_or_else(|| bad("unknown day"))?] = true,
                }
            }
        }
        let (from, to) = hours
            .trim()
            .split_once('-')
            .ok_or_else(|| bad("expected HH:MM-HH:MM"))?;
        let (from, to) = (
            minutes(from).ok_or_else(|| bad("bad start time"))?,
            minutes(to).ok_or_else(|| bad("bad end time"))?,
        );
        if from >= to {
            return Err(bad("the window must end after it starts, on the same day"));
        }
        Ok(Self {
            days,
            from,
            to,
            text: text.trim().to_owned(),
        })
    }

    /// Whether `now` is inside it.
    pub fn open(&self, now: SystemTime) -> bool {
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let days = secs / 86_400;
        // 1970-01-01 was a Thursday (index 3, Monday first).
        let weekday = ((days + 3) % 7) as usize;
        let minute = ((secs % 86_400) / 60) as u32;
        self.days[weekday] && minute >= self.from && minute < self.to
    }
}

/// A fixed freeze of the config: `START/END` in RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    from: SystemTime,
    to: SystemTime,
    text: String,
}

impl Period {
    /// Parses `2026-12-24T00:00:00Z/2026-12-27T00:00:00Z`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: String| {
            format!(
                "freeze {}: {why}; write START/END in RFC 3339, e.g. 2026-12-24T00:00:00Z/2026-12-27T00:00:00Z",
                baton_common::text::quote(text)
            )
        };
        let (a, b) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("expected START/END".into()))?;
        let from = humantime::parse_rfc3339_weak(a.trim()).map_err(|e| bad(e.to_string()))?;
        let to = humantime::parse_rfc3339_weak(b.trim()).map_err(|e| bad(e.to_string()))?;
        if to <= from {
            return Err(bad("it must end after it starts".into()));
        }
        Ok(Self {
            from,
            to,
            text: text.trim().to_owned(),
        })
    }
}

/// The config's windows and freezes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Calendar {
    /// Rollouts start hosts only inside one of these (none: always).
    pub windows: Vec<Window>,
    /// And never inside one of these.
    pub freezes: Vec<Period>,
}

impl Calendar {
    /// Why new hosts are held at `now`, given the operator's `manual`
    /// freeze; `None`: they are not.
    pub fn held(&self, manual: Option<&Freeze>, now: SystemTime) -> Option<String> {
        if let Some(f) = manual.filter(|f| f.holds(now)) {
            let until = f
                .until
                .map(|u| format!(" until {}", baton_common::time::rfc3339(u)))
                .unwrap_or_default();
            let why = if f.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", f.reason)
            };
            return Some(format!("frozen by {}{until}{why}", f.by));
        }
        if let Some(p) = self.freezes.iter().find(|p| now >= p.from && now < p.to) {
            return Some(format!("inside the configured freeze {}", p.text));
        }
        if !self.windows.is_empty() && !self.windows.iter().any(|w| w.open(now)) {
            let list: Vec<&str> = self.windows.iter().map(|w| w.text.as_str()).collect();
            return Some(format!(
                "outside the deployment windows ({}, UTC)",
                list.join("; ")
            ));
        }
        None
    }
}

/// `until` of a freeze request: unset is none, the past or more than
/// [`MAX_AHEAD`] is refused.
pub fn until_from_pb(
    until: Option<&baton_common::time::Timestamp>,
    now: SystemTime,
) -> Result<Option<SystemTime>, String> {
    let Some(t) = until else {
        return Ok(None);
    };
    let t = baton_common::time::from_timestamp(t).ok_or("until is not a valid time")?;
    if t <= now {
        return Err(format!(
            "until {} is not in the future",
            baton_common::time::rfc3339(t)
        ));
    }
    if t.duration_since(now).unwrap_or_default() > MAX_AHEAD {
        return Err("until is more than a year ahead".into());
    }
    Ok(Some(t))
}

/// A freeze's reason: at most [`MAX_REASON_CHARS`], no control characters.
pub fn check_reason(reason: &str) -> Result<String, String> {
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(format!(
            "reason is longer than {MAX_REASON_CHARS} characters"
        ));
    }
    if reason.chars().any(char::is_control) {
        return Err("reason holds control characters".into());
    }
    Ok(reason.to_owned())
}

/// The wire form of the freeze.
pub fn to_pb(view: &FreezeView) -> baton_proto::control::v1::FreezeStatus {
    use baton_common::time::to_timestamp;
    let f = view.freeze.as_ref();
    baton_proto::control::v1::FreezeStatus {
        frozen: f.is_some(),
        until: f.and_then(|f| f.until).map(to_timestamp),
        reason: f.map(|f| f.reason.clone()).unwrap_or_default(),
        by: f.map(|f| f.by.clone()).unwrap_or_default(),
        since: f.map(|f| to_timestamp(f.since)),
        held: view.held.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn windows_open_on_their_days_and_hours_in_utc() {
        let w = Window::parse("mon-fri 09:00-17:00").unwrap();
        // 2026-12-02 is a Wednesday.
        assert!(w.open(at("2026-12-02T10:00:00Z")));
        assert!(!w.open(at("2026-12-02T17:00:00Z")));
        assert!(!w.open(at("2026-12-05T10:00:00Z")), "a Saturday");
        let weekend = Window::parse("sat,sun 00:00-24:00").unwrap();
        assert!(weekend.open(at("2026-12-06T23:59:00Z")));
        let wrap = Window::parse("fri-mon 10:00-11:00").unwrap();
        assert!(wrap.open(at("2026-12-07T10:30:00Z")), "a Monday");
        assert!(!wrap.open(at("2026-12-08T10:30:00Z")), "a Tuesday");
        for bad in [
            "",
            "mon",
            "funday 09:00-10:00",
            "mon 10:00-09:00",
            "mon 25:00-26:00",
            "mon 09:00",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_freeze_holds_until_it_ends_and_says_why() {
        let cal = Calendar {
            windows: vec![Window::parse("daily 08:00-20:00").unwrap()],
            freezes: vec![Period::parse("2026-12-24T00:00:00Z/2026-12-27T00:00:00Z").unwrap()],
        };
        assert_eq!(cal.held(None, at("2026-12-02T10:00:00Z")), None);
        assert!(
            cal.held(None, at("2026-12-25T10:00:00Z"))
                .unwrap()
                .contains("configured freeze")
        );
        assert!(
            cal.held(None, at("2026-12-02T21:00:00Z"))
                .unwrap()
                .contains("outside the deployment windows")
        );
        let f = Freeze {
            until: Some(at("2026-12-03T00:00:00Z")),
            reason: "incident 42".into(),
            by: "operator alice".into(),
            since: at("2026-12-02T09:00:00Z"),
        };
        let why = cal.held(Some(&f), at("2026-12-02T10:00:00Z")).unwrap();
        assert!(
            why.contains("alice") && why.contains("incident 42"),
            "{why}"
        );
        assert_eq!(
            cal.held(Some(&f), at("2026-12-03T10:00:00Z")),
            None,
            "it ended"
        );
        assert!(Period::parse("2026-12-27T00:00:00Z/2026-12-24T00:00:00Z").is_err());
        assert!(Period::parse("yesterday/tomorrow").is_err());
    }
}
