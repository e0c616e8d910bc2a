//! Limits every JSON record is held to before a parser sees it.
//!
//! A record comes from outside: a Kafka message, a line of a file, a dead letter being
//! replayed, a remote function's answer, a value looked up in Redis or PostgreSQL. Two of the parsers Sluice uses walk nested values by recursion with no bound
//! of their own (sonic-rs when it skips a value, arrow-json when it quotes a value in an
//! error), so a record of a few hundred kilobytes of `[` would overflow the stack and
//! abort the process — on every restart, for a record that stays in its topic. So each
//! record's nesting is bounded here first, and a record over the limit is a bad record
//! like any other: a dead letter naming the limit, never a crash.
//!
//! sonic-rs needs a second, lower bound: its skip takes ~28 KiB of stack a level even
//! optimised (measured with gdb: 72 levels filled a 2 MiB thread, and tokio's workers have
//! 2 MiB), so the fast path hands it records nested at most [`FAST_DEPTH`] deep and leaves
//! deeper ones to arrow-json, whose tape decoder keeps its own stack on the heap.
//!
//! The check costs one vectorised count of `[` and `{` per record; only a record with
//! more openers than [`FAST_DEPTH`] is scanned for its real depth.

/// The deepest nesting of arrays and objects a record may have (serde_json's default).
pub const MAX_DEPTH: usize = 128;

/// The longest error text kept from a parser: arrow-json quotes the offending value, which
/// may be the whole (large) record.
const MAX_REASON: usize = 300;

/// The deepest nesting the fast path gives sonic-rs (the record's own object included).
pub const FAST_DEPTH: usize = 8;

/// Checks that `record` nests arrays and objects at most [`MAX_DEPTH`] levels deep, and
/// returns a bound on its depth that holds for every parser: the count of `[` and `{` when
/// it is at most [`FAST_DEPTH`], else more than [`FAST_DEPTH`].
///
/// Only the count of openers is a bound whatever a parser takes for the inside of a
/// string: parsers differ on malformed escapes (a `\u` without four hex digits), so where
/// this scan and sonic-rs's skip saw a string end differs, and a record this scan found 2
/// deep sent sonic-rs 1,800 levels down (found by the fuzz test, 2026-12-06; kept in the
/// connectors' `json::hostile::a_record_whose_strings_parsers_read_differently_is_not_a_crash`).
/// So a record with more openers than [`FAST_DEPTH`] never takes the fast path, however
/// shallow it looks.
///
/// # Errors
/// The reason, naming the limit, when it nests deeper.
pub fn check_depth(record: &[u8]) -> Result<usize, String> {
    // Depth never exceeds the number of openers; counting them vectorises.
    let openers = record
        .iter()
        .fold(0usize, |n, &b| n + usize::from(b == b'[' || b == b'{'));
    if openers <= FAST_DEPTH {
        return Ok(openers);
    }
    scan(record, false).map(|depth| depth.max(FAST_DEPTH + 1))
}

/// Checks one record of several that arrow-json decodes joined as lines (a JSON lines
/// file): within the nesting limit, and whole — it closes every string, array and object it
/// opens, and none it did not open.
///
/// arrow-json lets a string run on past a line break, so a line that is not whole would be
/// read together with the next: a string opened on one line would hide the next line's
/// brackets from a check of that line alone (and arrow-json, quoting them in an error,
/// recurses once per level), and rows would shift against their offsets. With every line
/// whole, arrow-json starts each line outside any string, as this scan does, and so reads
/// the nesting this scan counted. One scalar pass over the line.
///
/// # Errors
/// The reason: the nesting limit, or that the record is not whole.
pub fn check_line(record: &[u8]) -> Result<(), String> {
    scan(record, true).map(drop)
}

/// The deepest nesting of `record`, outside strings; with `whole`, also an error unless it
/// closes every string, array and object it opens and none it did not.
fn scan(record: &[u8], whole: bool) -> Result<usize, String> {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in record {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
                if depth > MAX_DEPTH {
                    return Err(format!(
                        "the record nests arrays and objects deeper than {MAX_DEPTH} levels \
                         (the nesting limit)"
                    ));
                }
            }
            b']' | b'}' => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None if whole => return Err(NOT_WHOLE.to_string()),
                None => {}
            },
            _ => {}
        }
    }
    if whole && (in_string || depth != 0) {
        return Err(NOT_WHOLE.to_string());
    }
    Ok(deepest)
}

const NOT_WHOLE: &str = "the record is not one whole JSON value: a string, array or object is left open or closed twice";

/// A parser's reason cut to a readable length (on a character boundary), saying how long
/// it was.
pub fn shorten(reason: String) -> String {
    if reason.len() <= MAX_REASON {
        return reason;
    }
    let mut cut = MAX_REASON;
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        "{}… ({} bytes of error text cut)",
        &reason[..cut],
        reason.len() - cut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_is_counted_outside_strings_only() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(
            check_depth(deep.as_bytes())
                .unwrap_err()
                .contains("nesting limit")
        );
        let at_limit = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(check_depth(at_limit.as_bytes()), Ok(MAX_DEPTH));
        assert_eq!(check_depth(br#"{"a": [1], "b": {"c": 2}}"#), Ok(3));
        // Brackets in strings (escaped quotes included) do not nest: within the limit, but
        // more openers than FAST_DEPTH, so not for the fast path.
        let quoted = format!(r#"{{"a": "\"{}"}}"#, "[".repeat(10 * MAX_DEPTH));
        assert_eq!(check_depth(quoted.as_bytes()), Ok(FAST_DEPTH + 1));
        // Many siblings are not depth, but more than FAST_DEPTH openers leave the fast path.
        let wide = format!("[{}]", "[],".repeat(10 * MAX_DEPTH) + "[]");
        assert_eq!(check_depth(wide.as_bytes()), Ok(FAST_DEPTH + 1));
    }

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        let long = "é".repeat(1000);
        let short = shorten(long);
        assert!(short.len() < 400, "{short}");
        assert!(short.ends_with("bytes of error text cut)"));
    }

    #[test]
    fn a_line_must_be_whole() {
        assert!(check_line(br#"{"a": "[}", "b": [1, {"c": "\"]"}]}"#).is_ok());
        for bad in [
            &br#"{"x":""#[..],
            br#"","id":[[[1]]]}"#,
            br#"{"a": 1"#,
            br#"{"a": 1}}"#,
            br#"{"a": "\"}"#,
        ] {
            let reason = check_line(bad).unwrap_err();
            assert!(reason.contains("not one whole"), "{reason}");
        }
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(
            check_line(deep.as_bytes())
                .unwrap_err()
                .contains("nesting limit")
        );
    }
}
