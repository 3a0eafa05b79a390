//! Text the agent sends to the coordinator, cut to the API's published
//! limits (`baton.v1.TextLimit`) before it is sent.
//!
//! The coordinator refuses a field that is too long or carries control
//! characters with INVALID_ARGUMENT and changes nothing. An agent that let
//! that happen to a release would keep the baton forever (a retried release
//! is refused the same way every time), so every reason, message and error
//! goes through one of the functions here. They are pure and never fail:
//! - [`reason`] and [`message`]: one line of at most 1 KiB; control
//!   characters (newlines included) become spaces;
//! - [`error`]: at most 16 KiB; newlines and tabs are kept (it carries the
//!   output tail), other control characters become U+FFFD. When the text
//!   is too long, its head (the error itself) and its tail (the last lines
//!   of output) are kept and the middle is dropped.
//!
//! Cuts fall on character boundaries, so the result is always valid UTF-8.

use baton_proto::v1::TextLimit;

/// The longest reason (acquire, release) in bytes.
pub const REASON_BYTES: usize = TextLimit::ReasonBytes as usize;
/// The longest report message in bytes (`TEXT_LIMIT_MESSAGE_BYTES`, an
/// alias of the reason limit).
pub const MESSAGE_BYTES: usize = TextLimit::ReasonBytes as usize;
/// The longest report error in bytes.
pub const ERROR_BYTES: usize = TextLimit::ErrorBytes as usize;

/// Marks where text was cut.
const ELLIPSIS: &str = "…";

/// A reason, fit for `AcquireRequest.reason` and `ReleaseRequest.reason`.
pub fn reason(text: &str) -> String {
    one_line(text, REASON_BYTES)
}

/// A progress message, fit for `ReportRequest.message`.
pub fn message(text: &str) -> String {
    one_line(text, MESSAGE_BYTES)
}

/// An error with its output, fit for `ReportRequest.error`.
pub fn error(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| match c {
            '\n' | '\t' => c,
            c if c.is_control() => char::REPLACEMENT_CHARACTER,
            c => c,
        })
        .collect();
    keep_head_and_tail(&clean, ERROR_BYTES)
}

fn one_line(text: &str, limit: usize) -> String {
    let clean: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    keep_head(&clean, limit)
}

/// The longest prefix of `text` that ends on a character boundary and is at
/// most `max` bytes.
fn prefix(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The longest suffix of `text` that starts on a character boundary and is
/// at most `max` bytes.
fn suffix(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// `text` if it fits in `limit` bytes, else its head and an ellipsis.
fn keep_head(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    format!("{}{ELLIPSIS}", prefix(text, limit - ELLIPSIS.len()))
}

/// `text` if it fits in `limit` bytes, else its first quarter and its last
/// three quarters around an ellipsis: the error comes first and the most
/// telling output lines last.
fn keep_head_and_tail(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let room = limit - ELLIPSIS.len();
    let head = prefix(text, room / 4);
    let tail = suffix(text, room - head.len());
    format!("{head}{ELLIPSIS}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_text_is_kept() {
        assert_eq!(reason("drain timed out"), "drain timed out");
        assert_eq!(error("exit status 3\nboom"), "exit status 3\nboom");
    }

    #[test]
    fn the_limits_are_the_published_ones() {
        assert_eq!(REASON_BYTES, 1024);
        assert_eq!(MESSAGE_BYTES, 1024);
        assert_eq!(ERROR_BYTES, 16384);
    }

    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary() {
        // 'é' is two bytes: an odd limit falls inside one.
        let long = "é".repeat(2000);
        let cut = reason(&long);
        assert!(cut.len() <= REASON_BYTES, "{}", cut.len());
        assert!(cut.ends_with(ELLIPSIS));
        assert!(cut.starts_with("éé"));
    }

    #[test]
    fn control_characters_never_reach_the_coordinator() {
        assert_eq!(message("a\nb\tc\u{7}d"), "a b c d");
        assert_eq!(
            error("a\nb\tc\u{7}d\u{1b}[0m"),
            "a\nb\tc\u{FFFD}d\u{FFFD}[0m"
        );
    }

    #[test]
    fn a_long_error_keeps_its_head_and_the_last_output() {
        let text = format!(
            "update failed: exit status 3\n{}\nE: the last line",
            "x".repeat(40_000)
        );
        let cut = error(&text);
        assert!(cut.len() <= ERROR_BYTES);
        assert!(cut.starts_with("update failed: exit status 3"));
        assert!(cut.ends_with("E: the last line"));
    }

    proptest! {
        #[test]
        fn every_result_fits_and_is_clean(text in ".{0,3000}", repeat in 1usize..20) {
            let text = text.repeat(repeat);
            let r = reason(&text);
            prop_assert!(r.len() <= REASON_BYTES);
            prop_assert!(!r.chars().any(char::is_control));
            let e = error(&text);
            prop_assert!(e.len() <= ERROR_BYTES);
            prop_assert!(!e.chars().any(|c| c.is_control() && c != '\n' && c != '\t'));
        }
    }
}
