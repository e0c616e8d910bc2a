//! Lookups in Redis and PostgreSQL: one round trip per batch for the keys the cache lacks.
//!
//! # Errors
//! Each server's errors are sorted the same three ways:
//! - **transient** (a connection lost, refused or timed out; a server loading its data, busy
//!   or failing over; PostgreSQL's SQLSTATE classes that mean "try again"): the batch fails
//!   as transient and the stage's retry policy waits it out;
//! - **permanent** for one key (a Redis key holding another type than the format reads, a
//!   stored value that does not fit the columns): that key's rows fail alone, the others
//!   are enriched;
//! - **refused** (a wrong or missing password, a user without the permission, a command or
//!   database the server does not have): no lookup can succeed, so the run stops, with a
//!   sentence that says what to check.
//!
//! Connection strings are never shown with their password: messages and logs name a Redis
//! server as `redis://:***@host:port`.
//!
//! # Where things are
//! Here: the contract of a remote lookup and the decoding shared by both servers.
//! `redis_remote.rs` and `postgres_remote.rs`: each server's configuration, connection (TLS included),
//! round trip and the sorting of its errors.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, RecordBatch, StringBuilder, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{DataType, SchemaRef};
use async_trait::async_trait;
use serde::Deserialize;
use sluice_engine::{Error, ErrorClass, Result, json_limits, plan_err};
use tokio::sync::OnceCell;

use crate::functions::redact;
mod postgres_remote;
mod redis_remote;

pub(super) use postgres_remote::PostgresLookup;
pub(super) use redis_remote::RedisLookup;

/// Where a stage's lookups go.
#[async_trait]
pub trait Remote: Send + Sync {
    /// Connects (in a worker's `open`); a server that is down now is not an error yet.
    async fn connect(&self) -> Result<()>;

    /// The values of those `keys` that exist. An error fails the whole call (a server that
    /// is down, a query refused); a stored value that does not fit the declared columns, or
    /// a key the server refuses on its own, fails its key alone.
    async fn fetch(&self, keys: &[String]) -> Result<Fetched>;

    /// For error messages: `redis://host:port` or `postgres table t`, without a password.
    fn describe(&self) -> String;

    /// Why no lookup can succeed for the rest of the run, once a call found out that the
    /// server refuses the stage itself (a wrong password, a missing permission): the stage
    /// then stops the run with this error.
    fn refused(&self) -> Option<Error> {
        None
    }
}

/// What one round trip found.
#[derive(Default)]
pub struct Fetched {
    /// The index in the asked keys, and that key's values as a one-row batch of its own.
    pub found: Vec<(usize, RecordBatch)>,
    /// Keys whose stored value could not be read as the declared columns, or that the
    /// server refused on their own (a Redis key of another type), and why.
    pub unreadable: Vec<(usize, String)>,
}

impl Fetched {
    /// Copies rows of `values` into one-row batches that own their memory (so that a cached
    /// entry never keeps a whole fetched batch alive): `(row, key)` gives the row of
    /// `values` holding the value of `keys[key]`.
    fn own_rows(
        &mut self,
        values: &RecordBatch,
        rows: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<()> {
        for (row, k) in rows {
            let one = take_record_batch(values, &UInt32Array::from(vec![row as u32]))
                .map_err(|e| Error::arrow("copying a looked-up row", e))?;
            self.found.push((k, one));
        }
        Ok(())
    }
}

/// Casts that fail on a value that does not convert, instead of making it null.
pub fn strict() -> arrow::compute::CastOptions<'static> {
    arrow::compute::CastOptions {
        safe: false,
        ..Default::default()
    }
}

/// Text columns (row `i` for key `keys[i]`) cast to the declared types. A key with a value
/// that does not convert is unreadable on its own; the others are found.
fn cast_texts(
    texts: Vec<ArrayRef>,
    keys: &[usize],
    schema: &SchemaRef,
    source: &str,
) -> Result<Fetched> {
    let mut bad: Vec<Option<String>> = vec![None; keys.len()];
    let mut columns = Vec::with_capacity(texts.len());
    for (text, field) in texts.iter().zip(schema.fields()) {
        let to = field.data_type();
        match arrow::compute::cast_with_options(text, to, &strict()) {
            Ok(column) => columns.push(column),
            Err(_) => {
                // Find the values that do not convert, row by row (only on this rare path).
                for (row, reason) in bad.iter_mut().enumerate() {
                    if let Err(e) =
                        arrow::compute::cast_with_options(&text.slice(row, 1), to, &strict())
                    {
                        reason.get_or_insert_with(|| {
                            format!("{source}: field `{}` is not {to}: {e}", field.name())
                        });
                    }
                }
                let lenient = arrow::compute::cast(text, to)
                    .map_err(|e| Error::arrow("casting looked-up values", e))?;
                columns.push(lenient);
            }
        }
    }
    let values = RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| Error::arrow("assembling looked-up values", e))?;
    let mut fetched = Fetched::default();
    let good = (0..keys.len()).filter(|&row| bad[row].is_none());
    fetched.own_rows(&values, good.map(|row| (row, keys[row])))?;
    fetched.unreadable = bad
        .into_iter()
        .enumerate()
        .filter_map(|(row, reason)| Some((keys[row], reason?)))
        .collect();
    Ok(fetched)
}

/// JSON objects (with the index of their key) decoded against the declared columns. Each
/// must be exactly one JSON value: an empty value, two values, or one that does not fit the
/// columns is unreadable on its own, and can never shift another key's row.
///
/// A value that is not one whole JSON value nested at most
/// [`json_limits::MAX_DEPTH`] deep never reaches the parser: arrow-json quoting a value in an
/// error recurses once per level (a stored `[[[…` would overflow the stack), and a value that
/// leaves a string open would run into the next.
fn decode_objects(objects: &[(usize, &str)], schema: &SchemaRef, source: &str) -> Result<Fetched> {
    let mut fetched = Fetched::default();
    let mut whole = Vec::with_capacity(objects.len());
    for &(k, object) in objects {
        match json_limits::check_line(object.as_bytes()) {
            Ok(()) => whole.push((k, object)),
            Err(reason) => fetched
                .unreadable
                .push((k, format!("{source}: the stored value: {reason}"))),
        }
    }
    let mut fetched = decode_whole(&whole, schema, source, fetched)?;
    fetched.unreadable.sort_by_key(|(k, _)| *k);
    Ok(fetched)
}

/// [`decode_objects`] of values each one whole JSON value within the nesting limit.
fn decode_whole(
    objects: &[(usize, &str)],
    schema: &SchemaRef,
    source: &str,
    mut fetched: Fetched,
) -> Result<Fetched> {
    let decoder = |rows: usize| {
        arrow::json::ReaderBuilder::new(schema.clone())
            .with_batch_size(rows.max(1) + 1)
            .build_decoder()
            .map_err(|e| Error::arrow("making a JSON decoder", e))
    };
    // All at once, checking that every value adds exactly one row.
    let mut all = decoder(objects.len())?;
    let at_once = objects.iter().all(|(_, object)| {
        let before = all.len();
        matches!(all.decode(object.as_bytes()), Ok(n) if n == object.len())
            && all.decode(b"\n").is_ok()
            && all.len() == before + 1
    });
    if at_once {
        if let Some(values) = all
            .flush()
            .map_err(|e| Error::arrow("decoding looked-up values", e))?
        {
            fetched.own_rows(
                &values,
                objects.iter().enumerate().map(|(row, (k, _))| (row, *k)),
            )?;
        }
        return Ok(fetched);
    }
    // One at a time, to tell the good from the bad.
    for &(k, object) in objects {
        let mut one = decoder(1)?;
        let read = one
            .decode(object.as_bytes())
            .and_then(|n| {
                one.decode(b"\n")?;
                Ok(n)
            })
            .and_then(|n| Ok((n, one.flush()?)));
        let reason = match read {
            Ok((n, Some(values))) if n == object.len() && values.num_rows() == 1 => {
                fetched.own_rows(&values, [(0, k)])?;
                continue;
            }
            Ok((_, None)) => "the stored value is empty, not a JSON object".to_string(),
            Ok(_) => "the stored value holds more than one JSON value".to_string(),
            Err(e) => format!("the stored value does not fit the declared columns: {e}"),
        };
        fetched.unreadable.push((k, format!("{source}: {reason}")));
    }
    Ok(fetched)
}

#[cfg(test)]
mod tests;
