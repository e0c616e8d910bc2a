//! The Nexmark source: one stream of people, auctions and bids in event-number order, the
//! way the benchmark's Flink table has them: `event_type` (0 person, 1 auction, 2 bid), one
//! struct column per kind (set for its kind, null otherwise) and `date_time`, the event
//! time.
//!
//! Event `k` (0-based, across partitions) belongs to partition `k % partitions`, so every
//! partition's event time advances at the same pace and a watermark over them moves as
//! the stream does. Its number is `k + 1`, its id `k + 2` and its time
//! `start + number / event_rate`, as `GeneratorConfig` computes them (first event number
//! and id 1).
//!
//! The hot loop appends to plain vectors, one field of each kind sharing a buffer (kinds
//! never share a row); long text fields are string views into pools of random text made
//! once, a bid's channel and url dictionary keys: nothing is allocated or copied per event
//! but a person's short strings. A kind's struct and all its fields share one null buffer
//! (null on the other kinds' rows), which hides the other kinds' values.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, DictionaryArray, Int32Array, Int64Array, RecordBatch, StringArray, StringViewArray,
    StructArray,
};
use arrow::buffer::{BooleanBuffer, Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Field, Fields, Int32Type, Schema, SchemaRef};
use async_trait::async_trait;
use sluice_engine::batch::{self, Envelope, PartitionInfo};
use sluice_engine::checkpoint::Checkpoint;
use sluice_engine::source::{Assignment, LogEnd, PartitionReader, Source};
use sluice_engine::{Error, Result};

use super::NexmarkConfig;
use super::model::{self, Text};
use crate::made::MadePartition;

/// Jan 1 2026, 00:00:00 UTC.
const DEFAULT_START_MS: i64 = 1_767_225_600_000;
/// The Nexmark benchmark's configured event rate (`TPS`): 10 million events per second.
const DEFAULT_EVENT_RATE: f64 = 10_000_000.0;

fn time_field(name: &str) -> Field {
    Field::new(name, batch::timestamp_type(), false)
}

/// A kind's fields are null on the other kinds' rows (their struct's nulls, shared), so that
/// `person.name` of an auction is null however it is read.
fn child_time(name: &str) -> Field {
    Field::new(name, batch::timestamp_type(), true)
}

/// A bid's channel and url: one of 10,004 each, dictionary-encoded.
fn dictionary() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

fn person_fields() -> Fields {
    Fields::from(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("email_address", DataType::Utf8, true),
        Field::new("credit_card", DataType::Utf8, true),
        Field::new("city", DataType::Utf8, true),
        Field::new("state", DataType::Utf8, true),
        child_time("date_time"),
        Field::new("extra", DataType::Utf8View, true),
    ])
}

fn auction_fields() -> Fields {
    Fields::from(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("item_name", DataType::Utf8View, true),
        Field::new("description", DataType::Utf8View, true),
        Field::new("initial_bid", DataType::Int64, true),
        Field::new("reserve", DataType::Int64, true),
        child_time("date_time"),
        child_time("expires"),
        Field::new("seller", DataType::Int64, true),
        Field::new("category", DataType::Int64, true),
        Field::new("extra", DataType::Utf8View, true),
    ])
}

fn bid_fields() -> Fields {
    Fields::from(vec![
        Field::new("auction", DataType::Int64, true),
        Field::new("bidder", DataType::Int64, true),
        Field::new("price", DataType::Int64, true),
        Field::new("channel", dictionary(), true),
        Field::new("url", dictionary(), true),
        child_time("date_time"),
        Field::new("extra", DataType::Utf8View, true),
    ])
}

/// The record fields of a Nexmark event, in order.
pub fn record_schema() -> Schema {
    Schema::new(vec![
        Field::new("event_type", DataType::Int32, false),
        Field::new("person", DataType::Struct(person_fields()), true),
        Field::new("auction", DataType::Struct(auction_fields()), true),
        Field::new("bid", DataType::Struct(bid_fields()), true),
        time_field("date_time"),
    ])
}

/// What every partition shares.
struct Plan {
    schema: SchemaRef,
    records: SchemaRef,
    partitions: u64,
    seed: u64,
    start_ms: i64,
    /// Microseconds of event time between consecutive events (`interEventDelayUs`).
    delay_us: f64,
    active_people: u64,
    in_flight_auctions: u64,
    text: Text,
}

impl Plan {
    /// `timestampForEvent`: milliseconds, truncated as the reference does.
    fn time_of(&self, number: i64) -> i64 {
        self.start_ms + (number as f64 * self.delay_us) as i64 / 1000
    }
}

pub struct NexmarkSource {
    plan: Arc<Plan>,
    config: NexmarkConfig,
    next_partition: u32,
    start: Arc<Checkpoint>,
}

impl NexmarkSource {
    pub fn new(config: NexmarkConfig) -> Result<Self> {
        let start_ms = match &config.start_time {
            Some(t) => crate::generator::parse_time_ms(t)
                .ok_or_else(|| Error::Plan(format!("nexmark start_time `{t}` is not RFC 3339")))?,
            None => DEFAULT_START_MS,
        };
        let event_rate = config
            .event_rate
            .or(config.rate)
            .unwrap_or(DEFAULT_EVENT_RATE);
        let records = Arc::new(record_schema());
        let plan = Plan {
            schema: batch::with_metadata(&records)?,
            records,
            partitions: u64::from(config.partitions.max(1)),
            seed: config.seed,
            start_ms,
            delay_us: 1e6 / event_rate,
            active_people: config.active_people.max(1),
            in_flight_auctions: config.in_flight_auctions.max(1),
            text: Text::new(config.seed),
        };
        Ok(NexmarkSource {
            plan: Arc::new(plan),
            config,
            next_partition: 0,
            start: Arc::default(),
        })
    }

    pub fn partitions(&self) -> u32 {
        self.config.partitions.max(1)
    }

    /// A reader for one partition, for benches and tests that drive partitions directly.
    /// It starts where the restored checkpoint says; events depend only on their number,
    /// so they are those an uninterrupted run would have made.
    pub fn partition(&self, id: u32) -> NexmarkPartition {
        NexmarkPartition {
            plan: self.plan.clone(),
            partition: u64::from(id),
            made: MadePartition::new(
                format!("nexmark/{id}"),
                id,
                self.partitions(),
                self.config.count,
                self.config.rate,
                &self.start,
            ),
        }
    }
}

#[async_trait]
impl Source for NexmarkSource {
    fn schema(&self) -> SchemaRef {
        self.plan.schema.clone()
    }

    fn partition_hint(&self) -> usize {
        self.partitions() as usize
    }

    fn restore(&mut self, checkpoint: Arc<Checkpoint>) {
        self.start = checkpoint;
    }

    async fn next_assignment(&mut self) -> Result<Option<Assignment>> {
        if self.next_partition >= self.partitions() {
            return Ok(None);
        }
        let reader = self.partition(self.next_partition);
        self.next_partition += 1;
        Ok(Some(Assignment::Assign(Box::new(reader))))
    }
}

pub struct NexmarkPartition {
    plan: Arc<Plan>,
    partition: u64,
    made: MadePartition,
}

impl NexmarkPartition {
    /// Makes the next `n` events of this partition (fewer when its count runs out).
    pub fn generate(&mut self, n: usize) -> Result<Envelope> {
        let n = self.made.clamp(n);
        let plan = &*self.plan;
        let mut columns = Columns::with_capacity(n);
        let first = self.made.next_offset();
        for i in 0..n as i64 {
            let k = (first + i) * plan.partitions as i64 + self.partition as i64;
            columns.event(plan, k);
        }
        let (records, event_time) = columns.finish(plan)?;
        self.made.envelope(&plan.schema, records, event_time)
    }
}

#[async_trait]
impl PartitionReader for NexmarkPartition {
    fn info(&self) -> &Arc<PartitionInfo> {
        self.made.info()
    }

    async fn read(&mut self, max: usize) -> Result<Option<Envelope>> {
        match self.made.due(max).await {
            Some(n) => self.generate(n).map(Some),
            None => Ok(None),
        }
    }

    fn log_end(&self) -> Option<Arc<dyn LogEnd>> {
        self.made.log_end()
    }
}

/// A kind's string column, dense (only that kind's rows): offsets and bytes.
struct TextColumn {
    offsets: Vec<i32>,
    bytes: Vec<u8>,
}

impl TextColumn {
    fn with_capacity(rows: usize, bytes: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        TextColumn {
            offsets,
            bytes: Vec::with_capacity(bytes),
        }
    }

    /// Appends to the current value; `end` closes it.
    #[inline]
    fn put(&mut self, s: &[u8]) {
        self.bytes.extend_from_slice(s);
    }

    #[inline]
    fn end(&mut self) {
        self.offsets.push(self.bytes.len() as i32);
    }

    #[inline]
    fn push(&mut self, s: &[u8]) {
        self.put(s);
        self.end();
    }

    /// The column over every row of the batch: empty on the other kinds' rows.
    fn finish(self, rows: &[u32], n: usize, nulls: &NullBuffer) -> ArrayRef {
        let offsets = spread_offsets(self.offsets, rows, n);
        // SAFETY: the offsets start at 0 and never decrease (spread_offsets keeps the
        // dense ones' order), and every value is ASCII: names, digits, the text pools.
        Arc::new(unsafe {
            StringArray::new_unchecked(
                OffsetBuffer::new_unchecked(ScalarBuffer::from(offsets)),
                self.bytes.into(),
                Some(nulls.clone()),
            )
        })
    }
}

/// Dense offsets (one more than `rows`) over every row: the other kinds' rows are empty.
fn spread_offsets(dense: Vec<i32>, rows: &[u32], n: usize) -> Vec<i32> {
    let mut out = Vec::with_capacity(n + 1);
    for (&row, &start) in rows.iter().zip(&dense) {
        // Rows up to this one start where its value starts.
        out.resize(row as usize + 1, start);
    }
    out.resize(n + 1, *dense.last().expect("offsets start with 0"));
    out
}

/// String views into one of the text pools.
fn views(values: ScalarBuffer<u128>, pool: &Buffer, nulls: &NullBuffer) -> ArrayRef {
    // SAFETY: every view was made by `make_view` from a slice of `pool` (buffer 0) at its
    // offset, or is the empty inline view (0); the pools are ASCII.
    Arc::new(unsafe {
        StringViewArray::new_unchecked(values, vec![pool.clone()], Some(nulls.clone()))
    })
}

fn ints(values: &ScalarBuffer<i64>, nulls: &NullBuffer) -> ArrayRef {
    Arc::new(Int64Array::new(values.clone(), Some(nulls.clone())))
}

fn times(v: &ScalarBuffer<i64>, nulls: Option<&NullBuffer>) -> ArrayRef {
    Arc::new(
        arrow::array::TimestampMillisecondArray::new(v.clone(), nulls.cloned())
            .with_timezone("UTC"),
    )
}

/// The arrays of one batch, filled event by event. The kinds never share a row, so a
/// buffer can hold one field of each kind: `ids` is a person's id, an auction's id and a
/// bid's auction at once, and each struct's fields take it under that struct's nulls
/// (which hide the other kinds' values). Every row pushes to every shared buffer (0 where
/// its kind has no such field); a person's text is kept densely and spread at the end.
struct Columns {
    kinds: Vec<i32>,
    date_time: Vec<i64>,
    /// person.id, auction.id, bid.auction.
    ids: Vec<i64>,
    /// auction.initial_bid, bid.bidder.
    second: Vec<i64>,
    /// auction.reserve, bid.price.
    third: Vec<i64>,
    seller: Vec<i64>,
    category: Vec<i64>,
    expires: Vec<i64>,
    /// Every kind's `extra` (views into the letters pool).
    extra: Vec<u128>,
    /// auction.item_name and auction.description (views into the words pool).
    item_name: Vec<u128>,
    description: Vec<u128>,
    /// bid.channel and bid.url: the dictionary key of both.
    channel: Vec<i32>,
    person: PersonText,
}

/// A person's text fields, dense (2% of the rows), with the rows they belong to.
struct PersonText {
    rows: Vec<u32>,
    name: TextColumn,
    email: TextColumn,
    credit_card: TextColumn,
    city: TextColumn,
    state: TextColumn,
}

impl Columns {
    fn with_capacity(n: usize) -> Self {
        let people = n / 40 + 2;
        Columns {
            kinds: Vec::with_capacity(n),
            date_time: Vec::with_capacity(n),
            ids: Vec::with_capacity(n),
            second: Vec::with_capacity(n),
            third: Vec::with_capacity(n),
            seller: Vec::with_capacity(n),
            category: Vec::with_capacity(n),
            expires: Vec::with_capacity(n),
            extra: Vec::with_capacity(n),
            item_name: Vec::with_capacity(n),
            description: Vec::with_capacity(n),
            channel: Vec::with_capacity(n),
            person: PersonText {
                rows: Vec::with_capacity(people),
                name: TextColumn::with_capacity(people, people * 14),
                email: TextColumn::with_capacity(people, people * 16),
                credit_card: TextColumn::with_capacity(people, people * 19),
                city: TextColumn::with_capacity(people, people * 13),
                state: TextColumn::with_capacity(people, people * 2),
            },
        }
    }

    /// Appends event `k` (0-based over the whole stream).
    #[inline]
    fn event(&mut self, plan: &Plan, k: i64) {
        let number = k + 1;
        let id = number + 1;
        let time = plan.time_of(number);
        let mut rng = model::event_rng(plan.seed, id);
        self.date_time.push(time);
        let rem = id % 50;
        if rem < 1 {
            self.kinds.push(model::PERSON);
            self.person(plan, id, &mut rng);
        } else if rem < 4 {
            self.kinds.push(model::AUCTION);
            self.auction(plan, number, id, time, &mut rng);
        } else {
            self.kinds.push(model::BID);
            self.bid(plan, id, &mut rng);
        }
    }

    fn person(&mut self, plan: &Plan, id: i64, rng: &mut fastrand::Rng) {
        let row = self.ids.len() as u32;
        self.ids
            .push(model::last_base0_person_id(id) + model::FIRST_PERSON_ID);
        let p = &mut self.person;
        p.rows.push(row);
        let first = model::FIRST_NAMES[rng.usize(..model::FIRST_NAMES.len())];
        let last = model::LAST_NAMES[rng.usize(..model::LAST_NAMES.len())];
        p.name.put(first.as_bytes());
        p.name.put(b" ");
        p.name.push(last.as_bytes());
        let text = &plan.text;
        let user = text.words_of(text.next_string(rng, 7));
        let domain = text.words_of(text.next_string(rng, 5));
        p.email.put(user);
        p.email.put(b"@");
        p.email.put(domain);
        p.email.push(b".com");
        let mut card = *b"0000 0000 0000 0000";
        for group in card.chunks_mut(5) {
            let mut v = rng.u32(..10_000);
            for digit in group[..4].iter_mut().rev() {
                *digit = b'0' + (v % 10) as u8;
                v /= 10;
            }
        }
        p.credit_card.push(&card);
        let city = model::US_CITIES[rng.usize(..model::US_CITIES.len())];
        let state = model::US_STATES[rng.usize(..model::US_STATES.len())];
        p.city.push(city.as_bytes());
        p.state.push(state.as_bytes());
        let size = 8
            + first.len()
            + 1
            + last.len()
            + user.len()
            + domain.len()
            + 5
            + card.len()
            + city.len()
            + state.len();
        let len = model::extra_length(rng, size, model::AVG_PERSON_BYTES);
        self.extra.push(text.letters_view(text.letters(rng, len)));
        for v in [
            &mut self.second,
            &mut self.third,
            &mut self.seller,
            &mut self.category,
            &mut self.expires,
        ] {
            v.push(0);
        }
        self.item_name.push(0);
        self.description.push(0);
        self.channel.push(0);
    }

    fn auction(&mut self, plan: &Plan, number: i64, id: i64, time: i64, rng: &mut fastrand::Rng) {
        self.ids
            .push(model::last_base0_auction_id(id) + model::FIRST_AUCTION_ID);
        let seller = if rng.u32(..model::HOT_SELLER_RATIO) > 0 {
            model::hot_person(id)
        } else {
            model::next_base0_person_id(id, rng, plan.active_people)
        };
        self.seller.push(seller + model::FIRST_PERSON_ID);
        self.category
            .push(model::FIRST_CATEGORY_ID + i64::from(rng.u32(..model::NUM_CATEGORIES)));
        let initial_bid = model::next_price(rng);
        self.second.push(initial_bid);
        // An auction stays open for up to twice the time `in_flight_auctions` auctions take
        // to be created (`nextAuctionLengthMs`).
        let events_for_auctions = (plan.in_flight_auctions * 50 / 3) as i64;
        let horizon = plan.time_of(number + events_for_auctions) - time;
        let length = 1 + rng.u64(..(horizon * 2).max(1) as u64) as i64;
        self.expires.push(time + length);
        let text = &plan.text;
        let item = text.next_string(rng, 20);
        let description = text.next_string(rng, 100);
        self.item_name.push(text.words_view(item));
        self.description.push(text.words_view(description));
        self.third.push(initial_bid + model::next_price(rng));
        let size = 8 + item.len() + description.len() + 8 + 8 + 8 + 8 + 8;
        let len = model::extra_length(rng, size, model::AVG_AUCTION_BYTES);
        self.extra.push(text.letters_view(text.letters(rng, len)));
        self.channel.push(0);
    }

    fn bid(&mut self, plan: &Plan, id: i64, rng: &mut fastrand::Rng) {
        let auction = if rng.u32(..model::HOT_AUCTION_RATIO) > 0 {
            model::hot_auction(id)
        } else {
            model::next_base0_auction_id(id, rng, plan.in_flight_auctions)
        };
        self.ids.push(auction + model::FIRST_AUCTION_ID);
        // Hot bidders are one past the hot sellers.
        let bidder = if rng.u32(..model::HOT_BIDDER_RATIO) > 0 {
            model::hot_person(id) + 1
        } else {
            model::next_base0_person_id(id, rng, plan.active_people)
        };
        self.second.push(bidder + model::FIRST_PERSON_ID);
        self.third.push(model::next_price(rng));
        self.channel.push(plan.text.channel(rng));
        let len = model::extra_length(rng, 32, model::AVG_BID_BYTES);
        self.extra
            .push(plan.text.letters_view(plan.text.letters(rng, len)));
        for v in [&mut self.seller, &mut self.category, &mut self.expires] {
            v.push(0);
        }
        self.item_name.push(0);
        self.description.push(0);
    }

    fn finish(self, plan: &Plan) -> Result<(RecordBatch, ArrayRef)> {
        let n = self.kinds.len();
        let kinds = &self.kinds;
        let nulls_of =
            |kind: i32| NullBuffer::new(BooleanBuffer::collect_bool(n, |i| kinds[i] == kind));
        let strukt = |fields: Fields, nulls: NullBuffer, children: Vec<ArrayRef>| {
            StructArray::try_new(fields, children, Some(nulls))
                .map(|a| Arc::new(a) as ArrayRef)
                .map_err(|e| Error::arrow("building Nexmark events", e))
        };
        let buffer = |v: Vec<i64>| ScalarBuffer::from(v);
        let time = buffer(self.date_time);
        let ids = buffer(self.ids);
        let second = buffer(self.second);
        let third = buffer(self.third);
        let extra = ScalarBuffer::from(self.extra);
        let text = &plan.text;
        let (letters, words) = (text.letters_buffer(), text.words());

        let m = &nulls_of(model::PERSON);
        let p = self.person;
        let rows = &p.rows[..];
        let person = strukt(
            person_fields(),
            m.clone(),
            vec![
                ints(&ids, m),
                p.name.finish(rows, n, m),
                p.email.finish(rows, n, m),
                p.credit_card.finish(rows, n, m),
                p.city.finish(rows, n, m),
                p.state.finish(rows, n, m),
                times(&time, Some(m)),
                views(extra.clone(), &letters, m),
            ],
        )?;

        let m = &nulls_of(model::AUCTION);
        let auction = strukt(
            auction_fields(),
            m.clone(),
            vec![
                ints(&ids, m),
                views(self.item_name.into(), &words, m),
                views(self.description.into(), &words, m),
                ints(&second, m),
                ints(&third, m),
                times(&time, Some(m)),
                times(&buffer(self.expires), Some(m)),
                ints(&buffer(self.seller), m),
                ints(&buffer(self.category), m),
                views(extra.clone(), &letters, m),
            ],
        )?;

        let m = &nulls_of(model::BID);
        // `channel` and `url` share their keys: one index per bid into both dictionaries.
        let keys = Int32Array::new(self.channel.into(), Some(m.clone()));
        let dictionary = |values: &ArrayRef| -> Result<ArrayRef> {
            DictionaryArray::<Int32Type>::try_new(keys.clone(), values.clone())
                .map(|d| Arc::new(d) as ArrayRef)
                .map_err(|e| Error::arrow("building Nexmark events", e))
        };
        let bid = strukt(
            bid_fields(),
            m.clone(),
            vec![
                ints(&ids, m),
                ints(&second, m),
                ints(&third, m),
                dictionary(&text.channels)?,
                dictionary(&text.urls)?,
                times(&time, Some(m)),
                views(extra, &letters, m),
            ],
        )?;

        let date_time = times(&time, None);
        let columns = vec![
            Arc::new(Int32Array::from(self.kinds)) as ArrayRef,
            person,
            auction,
            bid,
            date_time.clone(),
        ];
        let batch = RecordBatch::try_new(plan.records.clone(), columns)
            .map_err(|e| Error::arrow("building Nexmark events", e))?;
        Ok((batch, date_time))
    }
}

#[cfg(test)]
mod tests;
