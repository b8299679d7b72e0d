//! The one rule for versions: how two versions order (so whether a change
//! is a downgrade) and whether one meets a requirement. Packing, pushing,
//! plans, the state machine and the agent's rollback protection all ask
//! here, so they cannot disagree.

/// Checks a version as packed, pushed and planned: a semantic version
/// (`1.2.0`, `2.0.0-rc.1`, `1.2.0+build.7`) of at most 128 characters
/// from the name grammar plus `+`, every number fitting in 64 bits. One
/// grammar everywhere, so that any two versions have an order and a
/// downgrade is always seen. The error says which rule is broken.
pub fn check(version: &str) -> Result<(), String> {
    crate::names::check(version, Some('+'))?;
    semver::Version::parse(version).map(drop).map_err(|e| {
        format!(
            "it is not a semantic version like 1.4.0 or 2.0.0-rc.1 ({e}; every number must fit in 64 bits)"
        )
    })
}

/// Checks a version requirement (`>=1.4, <2`).
pub fn check_requirement(req: &str) -> Result<(), String> {
    semver::VersionReq::parse(req)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A version for ordering: a semantic version, or one written before
/// versions had to be (`2`, `1.4`), read as `2.0.0`, `1.4.0`.
pub fn order(v: &str) -> Option<semver::Version> {
    semver::Version::parse(v).ok().or_else(|| {
        let padded = match v.split('.').count() {
            1 => format!("{v}.0.0"),
            2 => format!("{v}.0"),
            _ => return None,
        };
        semver::Version::parse(&padded).ok()
    })
}

/// Whether going from version `from` to `to` goes down. A version that
/// cannot be ordered (one written before versions had to be semantic, or
/// one a hostile agent reports) is no evidence of a downgrade: refusing on
/// it would let such a report block every upgrade. Rollback protection
/// rests on the agent's record of the highest version it ran, which only
/// ever holds semantic versions.
pub fn is_downgrade(from: &str, to: &str) -> bool {
    match (order(from), order(to)) {
        (Some(from), Some(to)) => to < from,
        _ => false,
    }
}

/// Whether `version` satisfies the requirement `req` (semver syntax, such
/// as `>=1.4, <2`). A version that cannot be ordered satisfies nothing.
pub fn satisfies(version: &str, req: &str) -> bool {
    match (order(version), semver::VersionReq::parse(req)) {
        (Some(v), Ok(r)) => r.matches(&v),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_order_for_every_comparison() {
        assert!(is_downgrade("2.0.0", "1.9.9"));
        assert!(!is_downgrade("1.9.9", "2.0.0"));
        assert!(!is_downgrade("2.0.0", "2.0.0"));
        assert!(is_downgrade("2.0.0", "2.0.0-rc.1"));
        // Short versions order as their padded forms, in both the
        // downgrade check and requirements.
        assert!(is_downgrade("2", "1.5.0"));
        assert!(!is_downgrade("1.4", "1.5.0"));
        assert!(satisfies("2", ">=2.0.0"));
        assert!(satisfies("1.4", "~1.4"));
        // What cannot be ordered is no downgrade and meets no requirement.
        assert!(!is_downgrade("v1", "2.0.0"));
        assert!(!is_downgrade("2024.01.15", "1.0.0"));
        assert!(!satisfies("v1", "*"));
        assert!(!satisfies("1.0.0", "not a requirement"));
        assert!(check_requirement("not a requirement").is_err());
        assert_eq!(check_requirement(">=1.4, <2"), Ok(()));
    }

    #[test]
    fn versions_are_semantic_and_names() {
        for good in ["1.2.0", "2.0.0-rc.1", "1.2.0+build.7"] {
            assert_eq!(check(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "it is empty"),
            ("1.2", "not a semantic version"),
            ("v1.0.0", "not a semantic version"),
            ("1.0.0/x", "it contains '/'"),
            ("99999999999999999999.0.0", "64 bits"),
        ] {
            let e = check(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
