//! The one grammar of names: host ids, service names, label keys, key
//! names and (with `+`) versions. Names become directory names, file
//! names and store keys on hosts and in the coordinator, hence the strict
//! syntax: 1–128 characters from `[A-Za-z0-9._-]`, starting with a letter
//! or a digit (so never `.` or `..`).

/// The longest name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// The name every agent artifact carries, and no service may.
pub const AGENT_NAME: &str = "baton-agent";

/// Checks `value` against the grammar, also allowing `extra` after the
/// first character. The error says what is wrong without repeating the
/// value (callers name the field and quote a prefix).
pub fn check(value: &str, extra: Option<char>) -> Result<(), String> {
    let Some(first) = value.chars().next() else {
        return Err("it is empty".to_owned());
    };
    if value.len() > MAX_NAME_LEN {
        return Err(format!(
            "it is {} characters long, the limit is {MAX_NAME_LEN}",
            value.len()
        ));
    }
    if !first.is_ascii_alphanumeric() {
        return Err("it must start with a letter or digit".to_owned());
    }
    let allowed =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || Some(c) == extra;
    if let Some(c) = value.chars().find(|c| !allowed(*c)) {
        let plus = if extra.is_some() { ", '+'" } else { "" };
        return Err(format!(
            "it contains {c:?}; only letters, digits, '.', '_', '-'{plus} are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_grammar_for_every_name() {
        for good in ["api", "web-01.eu_west", "9", &"x".repeat(MAX_NAME_LEN)] {
            assert_eq!(check(good, None), Ok(()), "{good:?}");
        }
        for (bad, why) in [
            ("", "it is empty"),
            ("..", "must start with a letter or digit"),
            ("-x", "must start with a letter or digit"),
            ("a/b", "it contains '/'"),
            ("a b", "it contains ' '"),
            ("é", "must start with a letter or digit"),
            ("a\0", "it contains '\\0'"),
            ("1.0+b", "it contains '+'"),
        ] {
            let e = check(bad, None).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(
            check(&"x".repeat(MAX_NAME_LEN + 1), None)
                .unwrap_err()
                .contains("limit is 128")
        );
        assert_eq!(check("1.0+b", Some('+')), Ok(()));
    }
}
