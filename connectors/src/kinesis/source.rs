//! The Kinesis source: lists the stream's shards, assigns each to the engine as a
//! partition once its parents are done, and revokes a shard read to its end so that its
//! last records are checkpointed before its children start.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, SchemaRef};
use async_trait::async_trait;
use std::future::Future;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use sluice_engine::batch::{self, PartitionInfo};
use sluice_engine::checkpoint::Checkpoint;
use sluice_engine::source::{
    Assignment, CommitHook, Handoff, Member, PositionBook, ResumeAt, Source,
};
use sluice_engine::{Error, Result};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::lease::LeaseTable;
use super::members::{Membership, Passed, TakenShards, Wait, resume_of};
use super::position::{Book, Position};
use super::reader::{Fetch, MillisBehind, ReaderParts, ShardReader, Start};
use super::retry::{Backoff, Fault, classify};
use super::shards::{ShardDesc, Shards, partition_id};
use super::{KinesisSourceConfig, StartFrom, StreamRef};
use crate::format::SourceFormat;

pub struct KinesisSource {
    config: KinesisSourceConfig,
    stream: Arc<str>,
    /// How payloads decode: the reader schema and the writer schemas fetched so far.
    format: SourceFormat,
    schema: SchemaRef,
    dead_letters: bool,
    client: Option<aws_sdk_kinesis::Client>,
    shards: Shards,
    /// Partition ids of shards whose names carry no number.
    ids: BTreeMap<Arc<str>, u32>,
    checkpoint: Arc<Checkpoint>,
    book: Arc<Book>,
    /// Whether shards have been listed yet.
    listed: bool,
    next_listing: Instant,
    /// The listing under way, in a task of its own: the engine drops `next_assignment`
    /// whenever something else happens, and a listing (with its retries, and the client's
    /// region and credentials lookups) must not start over each time.
    listing: Option<JoinHandle<Result<Listing>>>,
    pending: VecDeque<Assignment>,
    /// Shards being read: each yields its partition name and shard once the shard was read
    /// to its end and its last records are checkpointed (`true`), or `false` when its
    /// reader went first (the pipeline stopped).
    draining: FuturesUnordered<BoxFuture<'static, ShardEnd>>,
    /// As one of several worker processes: the leases saying which shards it reads.
    membership: Option<Membership>,
    /// A fault found before the run (the lease table could not be made).
    failed: Option<Error>,
}

impl KinesisSource {
    pub fn new(
        config: KinesisSourceConfig,
        _batch_size: usize,
        dead_letters: bool,
    ) -> Result<Self> {
        let max_record = usize::try_from(config.max_record_size.0).unwrap_or(usize::MAX);
        let format = SourceFormat::open(&config.format_keys(), max_record)?;
        let schema = batch::with_metadata_fields(
            &format.records(),
            &batch::metadata_fields_with(&[Field::new(batch::SEQUENCE, DataType::Utf8, true)]),
        )?;
        Ok(KinesisSource {
            stream: config.stream_ref().name().into(),
            config,
            format,
            schema,
            dead_letters,
            client: None,
            shards: Shards::default(),
            ids: BTreeMap::new(),
            checkpoint: Arc::new(Checkpoint::default()),
            book: Arc::new(Book::default()),
            listed: false,
            next_listing: Instant::now(),
            listing: None,
            pending: VecDeque::new(),
            draining: FuturesUnordered::new(),
            membership: None,
            failed: None,
        })
    }

    fn partition_name(&self, shard: &str) -> Arc<str> {
        format!("{}/{shard}", self.stream).into()
    }

    /// Takes in a listing: on the first one of a pipeline with nothing checkpointed of
    /// this stream, `start_from: latest` starts at the open shards (closed ones hold only
    /// records older than "now").
    fn take_listing(&mut self, listing: Vec<(ShardDesc, bool)>) {
        let first = !self.listed;
        self.listed = true;
        let fresh = first && self.nothing_checkpointed();
        if fresh && self.config.start_from == StartFrom::Latest {
            for (shard, closed) in &listing {
                if *closed {
                    self.shards.skip(&shard.id);
                }
            }
        }
        if first {
            for (shard, _) in &listing {
                let name = self.partition_name(&shard.id);
                if self.checkpoint.positions.contains_key(name.as_ref()) {
                    self.shards.resume(&shard.id);
                }
            }
        }
        self.shards
            .listed(listing.into_iter().map(|(s, _)| s).collect());
        self.start_ready(first);
    }

    /// Whether the checkpoint restored at start holds nothing of this stream.
    fn nothing_checkpointed(&self) -> bool {
        let ours = format!("{}/", self.stream);
        !self.checkpoint.offsets.keys().any(|k| k.starts_with(&ours))
    }

    /// Assigns every shard whose parents are done (one process reads every shard).
    fn start_ready(&mut self, first_listing: bool) {
        for shard in self.shards.ready() {
            let at = self.checkpoint.resume_at(&self.partition_name(&shard));
            // Shards found after the first listing are children of shards read here: read
            // from their first record, whatever `start_from` says.
            self.start_shard(shard, at, !first_listing);
        }
    }

    /// Where a shard without a position starts.
    fn start_for(&self, child: bool) -> StartFrom {
        match (&self.config.start_from, child) {
            (StartFrom::Time(ms), _) => StartFrom::Time(*ms),
            (other, false) => other.clone(),
            (_, true) => StartFrom::Earliest,
        }
    }

    /// Starts reading `shard` where it resumes, or where a shard without a checkpoint
    /// starts.
    fn start_shard(&mut self, shard: Arc<str>, at: Option<ResumeAt>, child: bool) {
        let client = self
            .client
            .clone()
            .expect("the client is made before listing");
        let name = self.partition_name(&shard);
        let id = partition_id(&shard, &mut self.ids);
        // What an earlier reader of the shard read: a position names its offset, so a
        // drain still to commit without one resumes correctly from the last committed.
        self.book.forget(&name);
        let offset = at.as_ref().map_or(0, |at| at.offset);
        let position = at.and_then(|at| at.position);
        let (start, first, skip_before) = match position.as_deref().and_then(Position::parse) {
            Some(p) => (Start::After(p.after), p.next, offset.max(p.next)),
            None => {
                if let Some(text) = &position {
                    tracing::warn!(partition = %name, position = %text, "the checkpoint's position of this shard is unreadable; starting at `start_from`");
                }
                (Start::From(self.start_for(child)), offset, offset)
            }
        };
        tracing::info!(partition = %name, start = ?start, "shard assigned");
        let (end_signal, ended) = oneshot::channel();
        let (partition, ending) = (name.clone(), shard.clone());
        self.draining.push(Box::pin(async move {
            ShardEnd {
                partition,
                shard: ending,
                checkpointed: ended.await.is_ok(),
            }
        }));
        let info = Arc::new(PartitionInfo {
            id,
            name: name.clone(),
        });
        let parts = ReaderParts {
            info,
            stream: self.stream.clone(),
            schema: self.schema.clone(),
            decoder: self.format.decoder(),
            dead_letters: self.dead_letters,
            book: self.book.clone(),
            end_signal,
            // One process reads a shard's children after it; worker processes may not
            // (another member may take them), so there a shard's end closes its windows.
            continues_here: self.membership.is_none(),
            follows: match self.membership {
                None => self
                    .shards
                    .parents(&shard)
                    .iter()
                    .map(|p| self.partition_name(p))
                    .collect(),
                Some(_) => Vec::new(),
            },
        };
        let behind = Arc::new(MillisBehind::new(self.config.idle_wait.get()));
        if let Some(membership) = self.membership.as_mut() {
            membership.reading(&shard, behind.clone());
        }
        let fetch = Fetch {
            client,
            stream: self.config.stream_ref(),
            shard,
            name,
            idle_wait: self.config.idle_wait.get(),
            behind,
        };
        let reader = ShardReader::start(parts, fetch, start, first, skip_before);
        self.pending.push_back(Assignment::Assign(Box::new(reader)));
    }

    /// Acts on a pass over the lease table: stops reading lost shards at once, and drains
    /// the ones asked for before handing them over.
    fn on_pass(&mut self, passed: &Passed) {
        let Some(membership) = self.membership.as_mut() else {
            return;
        };
        let mut revokes = Vec::new();
        for shard in &passed.decisions.lost {
            tracing::warn!(stream = %self.stream, shard, "kinesis: another member took this shard's lease (this one was taken for gone); stopping it");
            // Drained like any revoked partition, so that the stages let its state go
            // (`StageState::release` after the drain's checkpoint); nobody waits for it.
            let (done, _) = oneshot::channel();
            revokes.push((shard.clone(), Some(done)));
        }
        for shard in &passed.decisions.asked {
            if !membership.can_hand_over(shard) {
                continue;
            }
            tracing::info!(stream = %self.stream, shard, "kinesis: handing the shard over to the member that asked");
            let (done, drained) = oneshot::channel();
            membership.handing_over(shard.clone(), drained);
            revokes.push((shard.clone(), Some(done)));
        }
        for (shard, drained) in revokes {
            let partition = partition_id(&shard, &mut self.ids);
            self.pending
                .push_back(Assignment::Revoke { partition, drained });
        }
    }

    /// Starts the taken shards where their state is.
    fn on_taken(&mut self, shards: &TakenShards) {
        for taken in &shards.taken {
            let name = self.partition_name(&taken.shard);
            let resume = resume_of(taken, shards, &self.checkpoint, &name);
            self.start_shard(taken.shard.as_str().into(), resume, taken.child);
        }
    }
}

#[async_trait]
impl Source for KinesisSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn partition_hint(&self) -> usize {
        // Unknown until the shards are listed; the engine caps workers at the cores.
        usize::MAX
    }

    fn restore(&mut self, checkpoint: Arc<Checkpoint>) {
        self.checkpoint = checkpoint;
    }

    fn position_book(&self) -> Option<Arc<dyn PositionBook>> {
        Some(self.book.clone())
    }

    fn commit_hook(&self) -> Option<Arc<dyn CommitHook>> {
        self.membership.as_ref().map(Membership::commit_hook)
    }

    fn set_member(&mut self, member: &Member) {
        match LeaseTable::open(&member.dir, &self.stream) {
            Ok(table) => {
                tracing::info!(member = %member.name, leases = %table.dir().display(), "kinesis: sharing the stream's shards through leases");
                self.membership = Some(Membership::new(
                    &self.stream,
                    table,
                    &member.name,
                    self.config.lease_duration.get(),
                    self.config.start_from == StartFrom::Latest,
                ));
            }
            Err(e) => self.failed = Some(Error::io(member.dir.join("leases"), e)),
        }
    }

    fn set_handoff(&mut self, handoff: Arc<dyn Handoff>) {
        if let Some(membership) = self.membership.as_mut() {
            membership.set_handoff(handoff);
        }
    }

    fn needs_checkpoints(&self) -> bool {
        true
    }

    async fn next_assignment(&mut self) -> Result<Option<Assignment>> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        loop {
            if let Some(next) = self.pending.pop_front() {
                return Ok(Some(next));
            }
            if self.listing.is_none() && Instant::now() >= self.next_listing {
                let (client, config) = (self.client.clone(), self.config.clone());
                self.listing = Some(tokio::spawn(discover(client, config)));
            }
            let listing_under_way = self.listing.is_some();
            let listing = &mut self.listing;
            let listed = std::future::poll_fn(|cx| match listing {
                Some(task) => std::pin::Pin::new(task).poll(cx),
                None => std::task::Poll::Pending,
            });
            let leasing = self.membership.is_some() && self.client.is_some();
            let membership = &mut self.membership;
            let leases = async move {
                match membership.as_mut() {
                    Some(m) => m.next().await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                Some(drained) = self.draining.next(), if !self.draining.is_empty() => Event::Drained(drained),
                listed = listed, if listing_under_way => Event::Listed(listed),
                _ = tokio::time::sleep_until(self.next_listing), if !listing_under_way => Event::Due,
                leased = leases, if leasing => Event::Leases(leased?),
            };
            match event {
                Event::Drained(ShardEnd {
                    partition: name,
                    shard,
                    checkpointed,
                }) => {
                    // A revoked shard's reader goes before its drain's checkpoint, which
                    // still asks the book for its position: the book forgets a shard only
                    // at its checkpointed end, or when the shard starts again.
                    if checkpointed {
                        self.book.forget(&name);
                        tracing::info!(partition = %name, "shard read to its end and checkpointed");
                        match self.membership.as_mut() {
                            Some(m) => m.shard_ended(&shard),
                            None => {
                                self.shards.done(&shard);
                                self.start_ready(false);
                            }
                        }
                    }
                }
                Event::Listed(listed) => {
                    self.listing = None;
                    let (client, listing) =
                        listed.map_err(|e| Error::task("Kinesis shard listing", e))??;
                    if listing.is_empty() {
                        return Err(Error::External {
                            system: "kinesis",
                            message: format!("the stream `{}` has no shards", self.stream),
                        });
                    }
                    self.client = Some(client);
                    self.next_listing = Instant::now() + self.config.discover_every.get();
                    let fresh = self.nothing_checkpointed();
                    match self.membership.as_mut() {
                        Some(m) => m.listed(listing, fresh),
                        None => self.take_listing(listing),
                    }
                }
                Event::Leases(Wait::Passed(passed)) => self.on_pass(&passed),
                Event::Leases(Wait::Taken(shards)) => self.on_taken(&shards),
                Event::Due => {}
            }
        }
    }
}

impl Drop for KinesisSource {
    fn drop(&mut self) {
        if let Some(listing) = &self.listing {
            listing.abort();
        }
    }
}

/// A shard's reader gone: at the shard's end, checkpointed, or not (the pipeline stopped).
struct ShardEnd {
    partition: Arc<str>,
    shard: Arc<str>,
    checkpointed: bool,
}

/// What `next_assignment` waited for.
enum Event {
    Drained(ShardEnd),
    Listed(std::result::Result<Result<Listing>, tokio::task::JoinError>),
    Leases(Wait),
    Due,
}

/// The client (made on the first listing) and every shard with whether it is closed.
type Listing = (aws_sdk_kinesis::Client, Vec<(ShardDesc, bool)>);

async fn discover(
    client: Option<aws_sdk_kinesis::Client>,
    config: KinesisSourceConfig,
) -> Result<Listing> {
    let client = match client {
        Some(c) => c,
        None => config.client_config().client().await,
    };
    let shards = list_shards(&client, config.stream_ref()).await?;
    Ok((client, shards))
}

/// Every shard of the stream (with whether it is closed), paging through ListShards;
/// retried while throttled or unreachable.
async fn list_shards(
    client: &aws_sdk_kinesis::Client,
    stream: StreamRef,
) -> Result<Vec<(ShardDesc, bool)>> {
    let name = stream.name().to_owned();
    let mut backoff = Backoff::new();
    let mut shards = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let call = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client
                .list_shards()
                .set_stream_name(stream.stream.clone())
                .set_stream_arn(stream.stream_arn.clone()),
        };
        match call.send().await {
            Ok(out) => {
                backoff.reset();
                for s in out.shards() {
                    let parents = [s.parent_shard_id(), s.adjacent_parent_shard_id()]
                        .into_iter()
                        .flatten()
                        .map(Arc::from)
                        .collect();
                    let closed = s
                        .sequence_number_range()
                        .is_some_and(|r| r.ending_sequence_number().is_some());
                    let desc = ShardDesc {
                        id: s.shard_id().into(),
                        parents,
                    };
                    shards.push((desc, closed));
                }
                match out.next_token() {
                    Some(t) => token = Some(t.to_owned()),
                    None => return Ok(shards),
                }
            }
            Err(e) => match classify(&format!("ListShards of `{}`", name), &e) {
                Fault::Stop(e) => return Err(e),
                Fault::Transient(why) => {
                    let wait = backoff.next();
                    tracing::warn!(stream = %name, retry_in = ?wait, "{why}");
                    tokio::time::sleep(wait).await;
                }
                Fault::Expired => {
                    shards.clear();
                    token = None;
                }
                Fault::Throttled => tokio::time::sleep(backoff.next()).await,
            },
        }
    }
}
