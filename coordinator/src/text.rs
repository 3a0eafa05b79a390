//! Text that clients send (reasons, progress messages, error reports):
//! bounded in bytes of UTF-8 and free of control characters, as the API
//! publishes (`baton.v1.TextLimit`). A control character would be stored
//! escaped (six bytes each in JSON) and can hide or rewrite what an
//! operator sees in a terminal; newline and tab are allowed.

use baton_proto::v1::TextLimit;

/// The longest reason (Acquire, Release, Pause, ForceRelease) or progress
/// message, in bytes.
pub const REASON_BYTES: usize = TextLimit::ReasonBytes as usize;
/// The longest progress message, in bytes.
pub const MESSAGE_BYTES: usize = TextLimit::ReasonBytes as usize;
/// The longest error report (a failed step's error with its output tail).
pub const ERROR_BYTES: usize = TextLimit::ErrorBytes as usize;
/// The longest boot_id (a UUID is 36).
pub const BOOT_ID_BYTES: usize = 64;
/// The longest identity recorded as an audit actor (names come from
/// certificates and TokenReviews, not from the request).
pub const ACTOR_BYTES: usize = 256;

/// Why a text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// Over the limit.
    #[error("{field} is {len} bytes long (UTF-8), the limit is {limit}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// A control character other than newline and tab.
    #[error(
        "{field} contains a control character (U+{code:04X}) at byte {at}; only newline and tab are allowed"
    )]
    Control {
        /// The field.
        field: &'static str,
        /// The character.
        code: u32,
        /// Its byte offset.
        at: usize,
    },
}

/// Accepts `value` for `field` when it is at most `limit` bytes of UTF-8 and
/// has no control character other than newline and tab.
pub fn check(field: &'static str, value: &str, limit: usize) -> Result<(), TextError> {
    if value.len() > limit {
        return Err(TextError::TooLong {
            field,
            len: value.len(),
            limit,
        });
    }
    match value
        .char_indices()
        .find(|(_, c)| c.is_control() && !matches!(c, '\n' | '\t'))
    {
        Some((at, c)) => Err(TextError::Control {
            field,
            code: u32::from(c),
            at,
        }),
        None => Ok(()),
    }
}

/// The longest prefix of `value` of at most `limit` bytes that ends on a
/// character boundary.
pub fn truncate(value: &str, limit: usize) -> &str {
    if value.len() <= limit {
        return value;
    }
    let mut end = limit;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_bytes_and_control_characters_are_refused() {
        assert_eq!(check("reason", &"a".repeat(1024), REASON_BYTES), Ok(()));
        assert!(matches!(
            check("reason", &"é".repeat(513), REASON_BYTES),
            Err(TextError::TooLong { len: 1026, .. })
        ));
        assert_eq!(check("error", "line 1\n\tline 2", ERROR_BYTES), Ok(()));
        for bad in ["\u{0}", "a\u{1b}[2J", "\r", "\u{7f}", "\u{9b}"] {
            let err = check("reason", bad, REASON_BYTES).unwrap_err();
            assert!(matches!(err, TextError::Control { .. }), "{bad:?}");
            assert!(err.to_string().contains("control character"), "{err}");
        }
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
