//! The consumer group: rebalance callbacks (assign, revoke and drain) and the commit hook.

use super::*;

/// Receives the consumer's callbacks on the polling thread.
pub(super) struct GroupContext {
    pub(super) shared: Arc<GroupState>,
    /// For the sentence that stops the run when the brokers refuse the client.
    pub(super) bootstrap: String,
    pub(super) sasl: Option<Box<super::super::KafkaSasl>>,
    pub(super) refused: AtomicBool,
}

impl ClientContext for GroupContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        super::super::log(level, fac, message);
    }

    fn generate_oauth_token(
        &self,
        config: Option<&str>,
    ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        super::super::security::oauth_token(config)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        super::super::client_error(&error, reason);
        // Refused credentials or an untrusted certificate: no retry cures them.
        if let Some(message) =
            super::super::security::refusal(&error, reason, &self.bootstrap, self.sasl.as_deref())
            && !self.refused.swap(true, Ordering::SeqCst)
        {
            let _ = self.shared.events.send(Event::Failed(Error::Refused {
                system: "kafka",
                message,
            }));
        }
    }
}

impl ConsumerContext for GroupContext {
    fn rebalance(
        &self,
        consumer: &GroupConsumer,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Without its state a partition is not read: the run stops on the error.
                if self.set_start_offsets(consumer, tpl) {
                    self.hand_out(tpl);
                }
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = assigned {
                    tracing::error!(error = %e, "kafka: assigning partitions failed");
                }
                // librdkafka keeps a pause across revoke and assign: a partition this member
                // paused before it lost it would come back paused, with a fresh buffer that
                // never asks for a resume.
                if let Err(e) = consumer.resume(tpl) {
                    tracing::warn!(error = %e, "kafka: resuming assigned partitions failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.drain(tpl, consumer.assignment_lost());
                let released = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = released {
                    tracing::error!(error = %e, "kafka: releasing partitions failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "kafka: rebalance failed; releasing partitions");
                self.drain(tpl, true);
                let _ = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
            }
        }
    }
}

impl GroupContext {
    /// Sets where each newly assigned partition starts (see the module documentation).
    /// False when the partitions' state could not be taken over (the run is stopping).
    pub(super) fn set_start_offsets(
        &self,
        consumer: &GroupConsumer,
        tpl: &mut TopicPartitionList,
    ) -> bool {
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        // A partition whose newest state another worker process committed starts exactly
        // where that state is (its offset is in that process's checkpoint, and in the
        // group's unless the group commit failed).
        let mut taken: HashMap<(String, i32), i64> = HashMap::new();
        if let Some(handoff) = self.shared.handoff.get() {
            let names: Vec<String> = parts.iter().map(|(t, p)| partition_name(t, *p)).collect();
            match handoff.take_over(&names) {
                Ok(offsets) => {
                    let mut known = self.shared.checkpointed.lock().expect("checkpointed lock");
                    for (name, at) in offsets {
                        if let Some((topic, partition)) = parse_name(&name) {
                            taken.insert((topic.to_string(), partition), at.offset);
                        }
                        known.insert(name, at.offset);
                    }
                }
                Err(e) => {
                    let _ = self.shared.events.send(Event::Failed(e));
                    return false;
                }
            }
        }
        let checkpointed: HashMap<(String, i32), i64> = {
            let known = self.shared.checkpointed.lock().expect("checkpointed lock");
            parts
                .iter()
                .filter_map(|(t, p)| Some(((t.clone(), *p), *known.get(&partition_name(t, *p))?)))
                .collect()
        };
        // The group's committed offsets, also for a pipeline with no checkpoint yet, and
        // each partition's log start and end now: every partition's start is then known at
        // its assignment, and so is its lag before its first record arrives (a partition
        // whose first fetch is slow is not taken for an idle one while the others close its
        // windows).
        let committed = committed_offsets(consumer, tpl);
        let bounds = log_bounds(consumer, &parts).unwrap_or_default();
        let checkpoint_first = self.shared.checkpoint_first.load(Ordering::Relaxed);
        let mut starts = HashMap::new();
        for key in &parts {
            let group = committed
                .as_ref()
                .and_then(|c| c.get(key).copied().flatten());
            let start = taken
                .get(key)
                .copied()
                .or(match (checkpointed.get(key), group) {
                    (Some(c), Some(_)) if checkpoint_first => Some(*c),
                    (Some(c), Some(g)) => Some((*c).max(g)),
                    (Some(c), None) => Some(*c),
                    (None, Some(g)) => Some(g),
                    (None, None) => None,
                });
            if let Some(o) = start {
                starts.insert(key.clone(), o);
            }
        }
        if let (StartFrom::Time(ms), true) = (&self.shared.start_from, starts.len() < parts.len()) {
            let mut times = TopicPartitionList::new();
            for (t, p) in parts.iter().filter(|key| !starts.contains_key(*key)) {
                let _ = times.add_partition_offset(t, *p, Offset::Offset(*ms));
            }
            match consumer.offsets_for_times(times, LOOKUP_TIMEOUT) {
                Ok(found) => {
                    starts.extend(answered(&found).filter_map(|(key, o)| Some((key, o?))));
                }
                Err(e) => tracing::warn!(error = %e, "kafka: offsets for start_from time failed"),
            }
        }
        for key in &parts {
            // `start_from` resolves only where the group answered that it has no offset: a
            // partition whose committed offset could not be read is left to librdkafka.
            let resolve = committed.as_ref().is_some_and(|c| c.contains_key(key));
            let start = start_offset(
                starts.get(key).copied(),
                resolve,
                bounds.get(key).copied(),
                &self.shared.start_from,
            );
            if let Some(o) = start {
                let _ = tpl.set_partition_offset(&key.0, key.1, Offset::Offset(o));
            }
        }
        true
    }

    /// Creates a buffer per new partition and hands its reader to the engine.
    pub(super) fn hand_out(&self, tpl: &TopicPartitionList) {
        let mut partitions = self.shared.partitions.lock().expect("partitions lock");
        for e in tpl.elements() {
            let key = (e.topic().to_string(), e.partition());
            let next_id = partitions.ids.len() as u32;
            let id = *partitions.ids.entry(key.clone()).or_insert(next_id);
            let buffer = Arc::new(PartitionBuffer::new(
                Arc::new(PartitionInfo {
                    id,
                    name: partition_name(e.topic(), e.partition()).into(),
                }),
                e.topic().into(),
                e.partition(),
                self.shared.batch_size,
            ));
            partitions.live.insert(key, buffer.clone());
            let reader = KafkaReader {
                decoder: self.shared.format.decoder(),
                schema: self.shared.schema.clone(),
                buffer,
                shared: self.shared.clone(),
                held: None,
                start: match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                },
            };
            tracing::info!(partition = %reader.buffer.info.name, "kafka partition assigned");
            let _ = self
                .shared
                .events
                .send(Event::Assignment(Assignment::Assign(Box::new(reader))));
        }
    }

    /// Revokes the partitions and waits until the engine has drained and checkpointed them.
    pub(super) fn drain(&self, tpl: &TopicPartitionList, lost: bool) {
        let mut waits = Vec::new();
        {
            let mut partitions = self.shared.partitions.lock().expect("partitions lock");
            for e in tpl.elements() {
                let key = (e.topic().to_string(), e.partition());
                let Some(buffer) = partitions.live.remove(&key) else {
                    continue;
                };
                partitions.draining.insert(key);
                // The reader keeps its buffer until the engine stops it: what it has taken
                // is processed; what is left is the next owner's to read.
                let (done, drained) = oneshot::channel();
                let revoke = Assignment::Revoke {
                    partition: buffer.info.id,
                    drained: Some(done),
                };
                if self.shared.events.send(Event::Assignment(revoke)).is_ok() {
                    waits.push((buffer.info.name.clone(), drained));
                }
            }
        }
        if self.shared.closing.load(Ordering::SeqCst) {
            // Shutting down: the engine has already drained and taken its last checkpoint.
            return;
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for (name, mut drained) in waits {
            loop {
                match drained.try_recv() {
                    Ok(()) | Err(oneshot::error::TryRecvError::Closed) => break,
                    // The source is closing (the engine has stopped): nothing will drain.
                    Err(oneshot::error::TryRecvError::Empty)
                        if self.shared.closing.load(Ordering::SeqCst) =>
                    {
                        break;
                    }
                    Err(oneshot::error::TryRecvError::Empty) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(oneshot::error::TryRecvError::Empty) => {
                        tracing::warn!(partition = %name, "kafka: partition not drained in time; releasing it (the next owner reads its last records again)");
                        break;
                    }
                }
            }
            tracing::info!(partition = %name, lost, "kafka partition revoked");
        }
        let mut partitions = self.shared.partitions.lock().expect("partitions lock");
        for e in tpl.elements() {
            partitions
                .draining
                .remove(&(e.topic().to_string(), e.partition()));
        }
    }
}

/// The partitions of a lookup's answer that the brokers answered without an error, each
/// with its offset (`None`: not an offset, such as the group having none).
fn answered(found: &TopicPartitionList) -> impl Iterator<Item = ((String, i32), Option<i64>)> + '_ {
    found
        .elements()
        .into_iter()
        .filter(|e| e.error().is_ok())
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            ((e.topic().to_string(), e.partition()), offset)
        })
}

/// The group's committed offset of each partition (`None`: the group has none); a
/// partition the brokers answered with an error is left out, and `None` when the lookup
/// failed.
fn committed_offsets(
    consumer: &GroupConsumer,
    tpl: &TopicPartitionList,
) -> Option<HashMap<(String, i32), Option<i64>>> {
    match consumer.committed_offsets(tpl.clone(), LOOKUP_TIMEOUT) {
        Ok(found) => Some(answered(&found).collect()),
        Err(e) => {
            tracing::warn!(error = %e, "kafka: reading committed offsets failed; starting from the checkpoint, else where librdkafka finds the group's offset");
            None
        }
    }
}

/// Each partition's log start and end now, asked in one round trip per leader (the end at
/// the consumer's isolation level: read_committed's last stable offset, as librdkafka's own
/// reset asks); a partition the brokers did not answer is left out.
fn log_bounds(
    consumer: &GroupConsumer,
    parts: &[(String, i32)],
) -> Option<HashMap<(String, i32), (i64, i64)>> {
    // A rebalance that only revoked assigns an empty list (librdkafka refuses to look up
    // none: "Invalid argument").
    if parts.is_empty() {
        return Some(HashMap::new());
    }
    let ask = |at: Offset| -> Option<HashMap<(String, i32), i64>> {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in parts {
            tpl.add_partition_offset(topic, *partition, at).ok()?;
        }
        match consumer.offsets_for_times(tpl, LOOKUP_TIMEOUT) {
            Ok(found) => Some(
                answered(&found)
                    .filter_map(|(key, o)| Some((key, o?)))
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "kafka: reading the partitions' log start and end failed; a partition with no offset has no known lag until its first record");
                None
            }
        }
    };
    let low = ask(Offset::Beginning)?;
    let high = ask(Offset::End)?;
    Some(
        low.into_iter()
            .filter_map(|(key, low)| Some((key.clone(), (low, *high.get(&key)?))))
            .collect(),
    )
}

/// Where a partition starts: `at` (a checkpoint's offset, a take-over's, the group's, or
/// the first record at `start_from`'s time), else, where the group said it has no offset
/// (`resolve`), `start_from` at the log's start or end now. An offset the log no longer
/// holds (retention deleted it) goes where librdkafka's reset takes it: the log's start for
/// `earliest`, its end otherwise. `None`: left to librdkafka (the start is then known from
/// the first record).
pub(super) fn start_offset(
    at: Option<i64>,
    resolve: bool,
    bounds: Option<(i64, i64)>,
    start_from: &StartFrom,
) -> Option<i64> {
    let reset = |(low, high): (i64, i64)| match start_from {
        StartFrom::Earliest => low,
        // A time with no record at or after it: the end, like `latest`.
        StartFrom::Latest | StartFrom::Time(_) => high,
    };
    match (at, bounds) {
        (Some(o), Some(b)) if o < b.0 => Some(reset(b)),
        (Some(o), _) => Some(o),
        (None, Some(b)) if resolve => Some(reset(b)),
        (None, _) => None,
    }
}

/// Commits the group's offsets after each checkpoint.
pub(super) struct GroupCommitter {
    pub(super) consumer: Arc<Mutex<Option<Arc<GroupConsumer>>>>,
    pub(super) shared: Arc<GroupState>,
}

impl CommitHook for GroupCommitter {
    fn committed(&self, checkpoint: &Checkpoint) {
        let mut tpl = TopicPartitionList::new();
        {
            let mut known = self.shared.checkpointed.lock().expect("checkpointed lock");
            let partitions = self.shared.partitions.lock().expect("partitions lock");
            for (name, offset) in &checkpoint.offsets {
                known.insert(name.clone(), *offset);
                // Only partitions this member owns: one released after a drain timed out
                // may have moved on under its new owner.
                let owned = |key: &(String, i32)| {
                    partitions.live.contains_key(key) || partitions.draining.contains(key)
                };
                if let Some((topic, partition)) = parse_name(name)
                    && owned(&(topic.to_string(), partition))
                {
                    let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(*offset));
                }
            }
        }
        let Some(consumer) = self.consumer.lock().expect("consumer lock").clone() else {
            return;
        };
        if tpl.count() == 0 {
            return;
        }
        // The checkpoint is durable already; a failed group commit only means a restart
        // without this checkpoint store begins a little earlier.
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!(error = %e, "kafka: committing group offsets failed");
        }
    }
}
