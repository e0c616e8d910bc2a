//! The polling thread (messages into partition buffers, rebalance callbacks) and the
//! log-end thread (each partition's high watermark, for lag and idleness).

use super::*;

pub(super) fn poll_loop(consumer: &GroupConsumer, shared: &GroupState) {
    let mut cached: Option<(u64, Arc<PartitionBuffer>)> = None;
    let mut last_warning: Option<Instant> = None;
    while !shared.closing.load(Ordering::SeqCst) {
        resume_caught_up(consumer, shared);
        let message = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                if let Some((code, reason)) = consumer.client().fatal_error() {
                    let _ = shared.events.send(Event::Failed(Error::External {
                        system: "kafka",
                        message: format!("the consumer failed for good: {code:?}: {reason}"),
                    }));
                    return;
                }
                // Brokers down, topics not there yet: librdkafka retries by itself.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!(error = %e, "kafka consumer (retrying)");
                    last_warning = Some(Instant::now());
                }
                continue;
            }
        };
        let generation = shared.generation.load(Ordering::SeqCst);
        let buffer = match &cached {
            Some((g, b))
                if *g == generation
                    && b.partition == message.partition()
                    && *b.topic == *message.topic() =>
            {
                b.clone()
            }
            _ => {
                let key = (message.topic().to_string(), message.partition());
                let live = shared.partitions.lock().expect("partitions lock");
                match live.live.get(&key) {
                    Some(b) => {
                        cached = Some((generation, b.clone()));
                        b.clone()
                    }
                    None => {
                        // Revoked while in flight: the next owner reads it.
                        continue;
                    }
                }
            }
        };
        if buffer.push(&message) {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&buffer.topic, buffer.partition);
            if let Err(e) = consumer.pause(&tpl) {
                tracing::warn!(partition = %buffer.info.name, error = %e, "cannot pause");
            }
        }
    }
}

/// How often the partitions' log end offsets are asked for.
pub(super) const WATERMARK_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps each owned partition's log end offset (high watermark) current, from the broker:
/// the offsets librdkafka caches come with fetches, and a paused partition is not fetched.
/// The engine's lag is this minus the committed offset, what consumer group tools show.
pub(super) fn watermark_loop(consumer: &GroupConsumer, shared: &GroupState) {
    let mut last_warning: Option<Instant> = None;
    while !shared.closing.load(Ordering::SeqCst) {
        let started = Instant::now();
        let live: Vec<Arc<PartitionBuffer>> = shared
            .partitions
            .lock()
            .expect("partitions lock")
            .live
            .values()
            .cloned()
            .collect();
        for buffer in live {
            if shared.closing.load(Ordering::SeqCst) {
                return;
            }
            match super::super::lag::watermarks(
                consumer,
                &buffer.topic,
                buffer.partition,
                LOOKUP_TIMEOUT,
            ) {
                Ok((low, high)) => {
                    buffer.log_end.low.store(low, Ordering::Relaxed);
                    buffer.log_end.high.store(high, Ordering::Relaxed);
                }
                Err(e) => {
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                        tracing::warn!(partition = %buffer.info.name, error = %e, "kafka: reading the log end offset failed (lag not updated)");
                        last_warning = Some(Instant::now());
                    }
                }
            }
        }
        // Sleeps in short steps so that closing is not held up.
        while started.elapsed() < WATERMARK_INTERVAL && !shared.closing.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A partition's log start and end offsets as last read from the broker; -1 before the
/// first read.
pub(super) struct Watermarks {
    pub(super) low: AtomicI64,
    pub(super) high: AtomicI64,
}

impl LogEnd for Watermarks {
    fn log_end(&self) -> Option<i64> {
        let high = self.high.load(Ordering::Relaxed);
        (high >= 0).then_some(high)
    }

    fn log_start(&self) -> Option<i64> {
        let low = self.low.load(Ordering::Relaxed);
        (low >= 0).then_some(low)
    }
}

pub(super) fn resume_caught_up(consumer: &GroupConsumer, shared: &GroupState) {
    let resume = std::mem::take(&mut *shared.resume.lock().expect("resume lock"));
    if resume.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in &resume {
        tpl.add_partition(topic, *partition);
    }
    if let Err(e) = consumer.resume(&tpl) {
        tracing::warn!(error = %e, "cannot resume partitions");
    }
}
