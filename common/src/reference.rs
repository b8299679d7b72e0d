//! What the generated reference (docs/reference) is made of: every key of
//! a file format with what it means, kept beside the code that reads the
//! format, and a check that the list and the reader agree.

/// One key of a file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The key, dotted for nested tables (`health.kind`,
    /// `service[].max_parallel`).
    pub key: &'static str,
    /// What it holds, e.g. `string`, `duration`, `["prog", "arg"]`.
    pub value: &'static str,
    /// Its default, or `required`, or empty when it has none.
    pub default: &'static str,
    /// What it means, one or a few sentences.
    pub about: &'static str,
}

/// The field names a serde "unknown field" error lists as expected
/// (``unknown field `x`, expected one of `a`, `b` `` or ``expected `a` ``):
/// how a test learns every key a `deny_unknown_fields` reader accepts.
pub fn expected_fields(message: &str) -> Vec<String> {
    let Some((_, list)) = message.split_once("expected") else {
        return Vec::new();
    };
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The fields a `deny_unknown_fields` reader accepts, sorted, from the
/// error it gave a probe key named `__probe`; an error about anything else
/// is returned as it is (the probe did not reach the table).
pub fn probed_fields(message: &str) -> Result<Vec<String>, String> {
    if !message.contains("unknown field `__probe`") {
        return Err(message.to_owned());
    }
    let mut fields = expected_fields(message);
    fields.sort();
    Ok(fields)
}

/// The keys of `keys` directly under `prefix` (`""` for the top level,
/// `"health."` for a table): the last dotted part, `[]` removed.
pub fn keys_under(keys: &[Key], prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = keys
        .iter()
        .filter_map(|k| k.key.strip_prefix(prefix))
        .filter(|rest| !rest.contains('.'))
        .map(|rest| rest.trim_end_matches("[]").to_owned())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `keys` as a Markdown table.
pub fn markdown(keys: &[Key]) -> String {
    let mut out = String::from("| key | value | default | meaning |\n|---|---|---|---|\n");
    for k in keys {
        let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            k.key,
            cell(k.value),
            if k.default.is_empty() {
                "—".to_owned()
            } else {
                cell(k.default)
            },
            cell(k.about)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_fields_are_read_from_serdes_message() {
        assert_eq!(
            expected_fields("unknown field `x`, expected one of `a`, `b_c`, `d`"),
            ["a", "b_c", "d"]
        );
        assert_eq!(expected_fields("unknown field `x`, expected `a`"), ["a"]);
        assert!(expected_fields("something else").is_empty());
        let keys = [
            Key {
                key: "a",
                value: "",
                default: "",
                about: "",
            },
            Key {
                key: "t.b",
                value: "",
                default: "",
                about: "",
            },
            Key {
                key: "s[]",
                value: "",
                default: "",
                about: "",
            },
            Key {
                key: "s[].c",
                value: "",
                default: "",
                about: "",
            },
        ];
        assert_eq!(keys_under(&keys, ""), ["a", "s"]);
        assert_eq!(keys_under(&keys, "s[]."), ["c"]);
        assert!(markdown(&keys).contains("| `t.b` |"));
    }
}
