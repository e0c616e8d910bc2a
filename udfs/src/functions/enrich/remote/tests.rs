use super::redis_remote::*;
use super::*;
use arrow::array::AsArray;
use arrow::datatypes::{Field, Int64Type, Schema};

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("plan", DataType::Utf8, true),
        Field::new("age", DataType::Int64, true),
    ]))
}

fn age(values: &RecordBatch) -> i64 {
    values.column(1).as_primitive::<Int64Type>().value(0)
}

#[test]
fn a_bad_json_value_fails_its_own_key_and_never_shifts_another() {
    let objects = [
        (0, r#"{"plan": "a", "age": 1}"#),
        (1, ""),
        (2, r#"{"plan": "b", "age": 2}{"plan": "x", "age": 99}"#),
        (3, r#"{"plan": "c", "age": "old"}"#),
        (4, r#"{"plan": "d", "age": 4}"#),
        (5, r#"{"plan": "e""#),
    ];
    let fetched = decode_objects(&objects, &schema(), "redis").unwrap();
    let found: Vec<(usize, i64)> = fetched.found.iter().map(|(k, v)| (*k, age(v))).collect();
    assert_eq!(found, [(0, 1), (4, 4)]);
    let bad: Vec<usize> = fetched.unreadable.iter().map(|(k, _)| *k).collect();
    assert_eq!(bad, [1, 2, 3, 5], "{:?}", fetched.unreadable);
    assert!(
        fetched.unreadable[0].1.contains("empty"),
        "{:?}",
        fetched.unreadable
    );
    assert!(
        fetched.unreadable[1].1.contains("more than one"),
        "{:?}",
        fetched.unreadable
    );
    // Each found row owns its memory: one row, not a slice of the whole fetch.
    assert!(fetched.found.iter().all(|(_, v)| v.num_rows() == 1));
}

#[test]
fn a_stored_value_nested_past_the_limit_is_unreadable_not_a_crash() {
    let deep = format!(
        r#"{{"plan": {}{}, "age": 1}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    // A value that leaves a string open, and one whose brackets only that string would
    // hide: decoded together, the second would be read as nested 100,000 deep.
    let hidden = format!(r#""{}"#, "[".repeat(100_000));
    let objects = [
        (0, deep.as_str()),
        (1, r#"{"plan": "a", "age": 1}"#),
        (2, r#"{"plan": ""#),
        (3, hidden.as_str()),
    ];
    let fetched = decode_objects(&objects, &schema(), "redis").unwrap();
    let found: Vec<usize> = fetched.found.iter().map(|(k, _)| *k).collect();
    assert_eq!(found, [1]);
    let bad: Vec<(usize, bool)> = fetched
        .unreadable
        .iter()
        .map(|(k, why)| (*k, why.contains("nesting limit")))
        .collect();
    assert_eq!(
        bad,
        [(0, true), (2, false), (3, false)],
        "{:?}",
        fetched.unreadable
    );
}

#[test]
fn good_json_values_are_decoded_at_once() {
    let objects = [
        (3, r#"{"plan": "a", "age": 1}"#),
        (1, r#"{"age": 2, "other": true}"#),
    ];
    let fetched = decode_objects(&objects, &schema(), "redis").unwrap();
    let found: Vec<(usize, i64)> = fetched.found.iter().map(|(k, v)| (*k, age(v))).collect();
    assert_eq!(found, [(3, 1), (1, 2)]);
    assert!(fetched.found[1].1.column(0).is_null(0));
    assert!(fetched.unreadable.is_empty());
}

#[test]
fn redis_urls_are_shown_without_their_password() {
    for (url, shown) in [
        (
            "redis://:secret@127.0.0.1:6379/0",
            "redis://:***@127.0.0.1:6379/0",
        ),
        (
            "rediss://app:se:cr@t@cache.internal:6380",
            "rediss://app:***@cache.internal:6380",
        ),
        ("redis://secret@host", "redis://***@host"),
        ("redis://:pa#ss@h:6379", "redis://:***@h:6379"),
        ("redis://:pa/s?s@h:6379/2", "redis://:***@h:6379/2"),
        (
            "postgres://app:pa/ss@db:5432/x",
            "postgres://app:***@db:5432/x",
        ),
        (
            "host=db user=app password=secret dbname=x",
            "host=db user=app password=*** dbname=x",
        ),
        ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
        (
            "redis+unix:///run/redis.sock?db=1&pass=secret",
            "redis+unix:///run/redis.sock?db=1&pass=***",
        ),
    ] {
        assert_eq!(redact(url), shown);
    }
}

#[test]
fn redis_errors_are_transient_permanent_or_refused() {
    let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
    assert_eq!(verdict(&io), Verdict::Transient);
    let timeout = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
    assert_eq!(verdict(&timeout), Verdict::Transient);
    let auth = redis::RedisError::from((
        redis::ErrorKind::AuthenticationFailed,
        "Password authentication failed",
    ));
    assert_eq!(verdict(&auth), Verdict::Refused);
    assert!(said(&auth).contains("password"), "{}", said(&auth));
    for (code, detail, expected) in [
        (
            "WRONGTYPE",
            "Operation against a key holding the wrong kind of value",
            Verdict::Permanent,
        ),
        ("NOAUTH", "Authentication required.", Verdict::Refused),
        (
            "WRONGPASS",
            "invalid username-password pair",
            Verdict::Refused,
        ),
        (
            "NOPERM",
            "this user has no permissions to run the 'hgetall' command",
            Verdict::Refused,
        ),
        (
            "ERR",
            "unknown command 'HGETALL', with args beginning with: ",
            Verdict::Refused,
        ),
        ("ERR", "max number of clients reached", Verdict::Transient),
        (
            "LOADING",
            "Redis is loading the dataset in memory",
            Verdict::Transient,
        ),
        (
            "BUSY",
            "Redis is busy running a script.",
            Verdict::Transient,
        ),
        (
            "TRYAGAIN",
            "Multiple keys request during rehashing of slot",
            Verdict::Transient,
        ),
    ] {
        let e = redis::make_extension_error(code.into(), Some(detail.into()));
        assert_eq!(verdict(&e), expected, "{code} {detail}");
        assert_eq!(said(&e), format!("{code} {detail}"));
    }
}

#[test]
fn a_hash_field_that_does_not_convert_fails_its_own_key() {
    let texts: Vec<ArrayRef> = vec![
        Arc::new(arrow::array::StringArray::from(vec![
            Some("a"),
            Some("b"),
            None,
        ])),
        Arc::new(arrow::array::StringArray::from(vec![
            Some("1"),
            Some("two"),
            Some("3"),
        ])),
    ];
    let fetched = cast_texts(texts, &[7, 8, 9], &schema(), "redis").unwrap();
    let found: Vec<(usize, i64)> = fetched.found.iter().map(|(k, v)| (*k, age(v))).collect();
    assert_eq!(found, [(7, 1), (9, 3)]);
    assert_eq!(fetched.unreadable.len(), 1);
    assert_eq!(fetched.unreadable[0].0, 8);
    assert!(
        fetched.unreadable[0].1.contains("field `age` is not Int64"),
        "{:?}",
        fetched.unreadable
    );
}
